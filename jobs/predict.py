"""`python -m jobs.predict`: panet predict ...: inference on images or shards"""

import sys

from jobs.entry import run

if __name__ == "__main__":
    sys.exit(run(["predict"]))
