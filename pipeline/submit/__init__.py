"""`panet submit`: run a `jobs.<name>` entrypoint on a Ray cluster through its job server.

`cli.py` (the sub-command: options, the job name, the order of the steps), `check.py` (the job
checked here with its own command's parser before anything is uploaded), `runtime_env.py` (what
is uploaded and installed), `client.py` (the job server: address, submit, logs, stop, list).
"""


class SubmitError(ValueError):
    """A problem found before or while talking to the job server; printed as one line."""
