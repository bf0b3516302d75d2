"""Exception types for input that dami-jax cannot use, so that callers can tell them from bugs.

Every message names the file, setting or argument at fault. The command line prints these as one
line and exits with code 2; any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations


class InputError(ValueError):
    """A file, setting or argument that cannot be used as given."""


class MissingExtraError(ImportError):
    """An optional dependency is not installed; the message names the pip command that installs it."""
