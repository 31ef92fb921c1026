"""The one base class of lxm's bad-input errors.

Every error that means "this file, record, option or setting cannot be used" derives from `LxmError`; its message is
a single line that names the file (and line, record or field). `lxm` prints exactly these (and `OSError`s, which name
their file) as one-line errors; any other exception is a bug and keeps its traceback. Existing classes keep their
old second base (`ValueError`, `RuntimeError`), so callers that caught those still do.
"""

from __future__ import annotations


class LxmError(Exception):
    """Bad user input: the message names the file, record or field and says what is wrong."""


class ConfigError(LxmError, ValueError):
    """An option, a config key or a config file cannot be used; the message names the file / key."""


class MissingDependencyError(LxmError, ImportError):
    """An optional dependency that the chosen option needs is not installed; the message says how to get it."""
