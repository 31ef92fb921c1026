"""Checks of the paths a command will write, made before any model runs.

A prediction run or an `lxm ask --questions` batch that ends with "`.out.tmp-PID`: Is a directory" has thrown its
work away and names a file the user never gave. These checks name the user's own path and the option, at once.
A missing parent folder is fine (the writers create it, `lxm.atomic.atomic_path`); a parent that is a file, or a
folder this process may not write in, is not.
"""

from __future__ import annotations

import os
from pathlib import Path

from lxm.errors import ConfigError


def _nearest_existing(path: Path) -> Path:
    parent = path.parent if str(path.parent) else Path(".")
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    return parent


def _check_parent(path: Path, option: str) -> None:
    parent = _nearest_existing(path)
    if not parent.is_dir():
        raise ConfigError(f"{option} {path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{option} {path}: cannot write in the folder {parent} (permission denied)")


def check_output_file(path: str | os.PathLike, option: str) -> Path:
    """`path` can be written as a file: it is not a directory and its folder can be made and written."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise ConfigError(f"{option} {path}: is a directory (give a file name inside it)")
    _check_parent(path, option)
    return path


def check_output_dir(path: str | os.PathLike, option: str) -> Path:
    """`path` can be a folder to write files into: a folder already, or one that can be made."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{option} {path}: is a file, not a folder")
    if path.is_dir():
        if not os.access(path, os.W_OK | os.X_OK):
            raise ConfigError(f"{option} {path}: cannot write in this folder (permission denied)")
        return path
    _check_parent(path, option)
    return path
