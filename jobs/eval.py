"""`python -m jobs.eval`: panet eval --checkpoint DIR --data SHARDS"""

import sys

from jobs.entry import run
from pipeline.evaluate.cli import add_parser

if __name__ == "__main__":
    sys.exit(run(add_parser, ["eval"]))
