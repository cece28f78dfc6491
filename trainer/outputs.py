"""Output folders, checked before any work: a path that is a file or cannot be written is one clear line.

Writability is tried, not guessed from permission bits: a temporary file is created (and removed at once) in
the folder, or in its nearest existing parent when the folder does not exist yet, so read-only file systems
and root's view of permissions are judged as the real write will be.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from trainer.errors import UserError


def check_writable_folder(path: str | Path, key: str) -> Path:
    """``path`` as a folder that exists and is writable, or can be created; nothing is created."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise UserError(f"{key}: {str(path)!r} is a file; give a folder path")
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise UserError(f"{key}: {str(path)!r} cannot be created because {str(existing)!r} is a file")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise UserError(f"{key}: {str(existing)!r} is not writable ({error.strerror or error})") from None
    return path
