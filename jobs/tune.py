"""`python -m jobs.tune`: panet tune ...: a Ray Tune sweep"""

import sys

from jobs.entry import run
from pipeline.tune.cli import add_parser

if __name__ == "__main__":
    sys.exit(run(add_parser, ["tune"]))
