"""User-facing errors.

Anything a user can get wrong (a YAML key, a path, a rank) raises `AutorankError` before compute
starts; the CLI prints its message as one line and exits non-zero, without a traceback.
"""


class AutorankError(Exception):
    """A problem with the user's input, reported as a single line."""


class TrialDiverged(AutorankError):
    """Training produced a non-finite loss; the search records the trial as failed and goes on."""
