"""How parclean reads a relative path, in words for error messages.

Every relative path in a config file, a --set override or a command-line flag is read from the working directory
of the command (the repository root for the shipped configs), except `base:`, which is read from the folder of the
config file that names it. A message about a missing path names the path as written and where it looked.
"""

from __future__ import annotations

import os
from pathlib import Path

WORKING_DIRECTORY = "the working directory"


def looked_for(path: str | os.PathLike, relative_to: str = WORKING_DIRECTORY) -> str:
    """'' for an absolute path; else ' (looked for /ABSOLUTE/PATH: relative paths start at RELATIVE_TO)'."""
    expanded = Path(path).expanduser()
    if expanded.is_absolute():
        return ""
    return f" (looked for {os.path.abspath(expanded)}: relative paths start at {relative_to})"
