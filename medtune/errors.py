"""Errors that reach the user as one line and exit code 2.

Library code raises a subclass of :class:`MedtuneError` with a message that names the
file, case, key or tensor at fault; the CLI prints it as one line and exits with 2.
"""

from __future__ import annotations


class MedtuneError(Exception):
    """Base class for every error medtune reports to the user (exit code 2)."""


class ConfigError(MedtuneError):
    """A config file or override is wrong: unknown key, bad type, missing value."""


class DataError(MedtuneError):
    """A dataset is wrong: missing file, shape mismatch, NaN/Inf, bad label values."""


class CheckpointError(MedtuneError):
    """A weight file or run folder is missing, corrupt, or of another architecture."""
