"""Atomic files: written under a temporary sibling name and renamed into place, so a kill never leaves half a file."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path


@contextlib.contextmanager
def temporary(path: Path, directory: bool = False):
    """A temporary sibling of `path`, renamed onto it when the block succeeds, removed when it fails."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if directory:
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    else:
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        tmp = Path(name)
    try:
        os.chmod(tmp, 0o755 if directory else 0o644)
        yield tmp
        if directory and path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True) if directory else tmp.unlink(missing_ok=True)
        raise


def write_json(path: Path, data: dict) -> None:
    with temporary(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, default=float) + "\n")


