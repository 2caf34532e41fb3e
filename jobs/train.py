"""`python -m jobs.train`: panet train --config FILE [--set KEY=VALUE ...]"""

import sys

from jobs.entry import run

if __name__ == "__main__":
    sys.exit(run(["train"]))
