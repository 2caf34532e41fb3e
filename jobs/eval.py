"""`python -m jobs.eval`: panet eval --checkpoint DIR --data SHARDS"""

import sys

from jobs.entry import run

if __name__ == "__main__":
    sys.exit(run(["eval"]))
