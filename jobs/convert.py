"""`python -m jobs.convert`: panet data convert {coco,mvd,cityscapes} ...: records to Parquet shards"""

import sys

from jobs.entry import run

if __name__ == "__main__":
    sys.exit(run(["data", "convert"]))
