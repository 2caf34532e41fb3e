"""`python -m jobs.predict`: panet predict ...: inference on images or shards"""

import sys

from jobs.entry import run
from pipeline.predict.cli import add_parser

if __name__ == "__main__":
    sys.exit(run(add_parser, ["predict"]))
