"""User-facing error types.

Every error a user can cause (bad file, bad value, existing output) is an
``HpcdeconvError``. The CLI prints its message as a single line and exits
non-zero; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class HpcdeconvError(Exception):
    """Base class of errors caused by user input; the message is one line."""


class ConfigError(HpcdeconvError):
    """A configuration file or override is invalid."""


class InputError(HpcdeconvError):
    """An input file is missing, unreadable or of the wrong shape or content."""


class OutputExistsError(HpcdeconvError):
    """The output path exists and neither overwrite nor resume was requested."""


class OutputLockedError(HpcdeconvError):
    """Another run is writing the output (the message names it), or it cannot be locked."""
