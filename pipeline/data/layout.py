"""A shard directory's bookkeeping names and the default shard size.

Standard library only: `panet data convert --help` shows the default without loading pyarrow.
"""

from __future__ import annotations

DEFAULT_SHARD_SIZE = 256  # rows per shard: ~40 MB of COCO JPEGs, enough files to spread reads

PROGRESS_DIR = "_progress"

RUN_FILE = "run.json"
