"""`python -m jobs.convert`: panet data convert {coco,mvd,cityscapes} ...: records to Parquet shards"""

import sys

from jobs.entry import run
from pipeline.data.cli import add_parser

if __name__ == "__main__":
    sys.exit(run(add_parser, ["data", "convert"]))
