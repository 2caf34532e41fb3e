"""`python -m jobs.train`: panet train --config FILE [--set KEY=VALUE ...]"""

import sys

from jobs.entry import run
from pipeline.train.cli import add_parser

if __name__ == "__main__":
    sys.exit(run(add_parser, ["train"]))
