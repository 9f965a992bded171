"""The two kinds of failure a user sees, and the exit code ``dsl`` gives each.

Library code raises a subclass of one of these (or a plain ``ValueError``/``FileNotFoundError``
for bad input); the ``dsl`` command prints the message on one line and exits with the code,
never with a traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(ValueError):
    """Bad input: a config key, a path, a file's content. ``dsl`` exits with 2."""

    exit_code = 2


class JobFailed(RuntimeError):
    """The input was valid but the job could not finish as asked. ``dsl`` exits with 1."""

    exit_code = 1
