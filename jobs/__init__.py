"""Entrypoints for `ray job submit --working-dir . -- python -m jobs.<name> ...`.

Each one is the matching `panet` sub-command, run through the same CLI code path.
"""
