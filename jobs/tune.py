"""`python -m jobs.tune`: panet tune ...: a Ray Tune sweep"""

import sys

from jobs.entry import run

if __name__ == "__main__":
    sys.exit(run(["tune"]))
