"""File modes of atomically written outputs.

`tempfile.mkstemp` / `mkdtemp` create files 0600 and directories 0700 (safetensors also writes its files
0600), so a file or directory written through a temporary path and renamed would stay private whatever the
user's umask. `umask_mode` gives it the mode a plain `open` / `mkdir` would have given it.
"""

from __future__ import annotations

import os
from pathlib import Path


def umask_mode(path: str | Path, directory: bool = False) -> None:
    """chmod `path` to 0666 (0777 for a directory) minus the process's umask."""
    umask = os.umask(0)  # reading the umask means setting it: put it straight back
    os.umask(umask)
    os.chmod(path, (0o777 if directory else 0o666) & ~umask)
