"""User-facing errors.

Anything a user can get wrong (a YAML key, a path, a rank) raises `AutorankError` before compute
starts; the CLI prints its message as one line and exits non-zero, without a traceback.
"""

__all__ = ["AutorankError", "TrackingFailed", "TrialDiverged"]


class AutorankError(Exception):
    """A problem with the user's input, reported as a single line."""

    exit_code = 2


class TrackingFailed(AutorankError):
    """MLflow failed after the work was done and kept (e.g. a verified export not registered): exit 1."""

    exit_code = 1


class TrialDiverged(AutorankError):
    """Training produced a non-finite loss; the search records the trial as failed and goes on."""
