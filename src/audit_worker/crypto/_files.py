"""Helpers for reading and creating secret key files."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from .errors import KeyUnavailableError


def read_secret(path: Path, what: str) -> bytes | None:
    """Return the file's bytes, ``None`` if it does not exist; other OS errors are fatal."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise KeyUnavailableError(
            f"cannot read {what} file {path} ({type(exc).__name__}): check the file exists, "
            "is readable by the worker user and the volume is mounted",
            ref=str(path),
        ) from exc


def create_secret(path: Path, data: bytes, what: str) -> bool:
    """Atomically create *path* with mode 0600 holding *data*.

    Returns False if another process created the file first; the caller must then read it.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        # mkstemp creates the file 0600 regardless of umask, so the secret is never
        # readable by others, not even briefly.
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    except OSError as exc:
        raise KeyUnavailableError(
            f"cannot create {what} file {path} ({type(exc).__name__}): check the directory "
            "exists and is writable by the worker user",
            ref=str(path),
        ) from exc
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        # link() fails if the target exists: no clobbering of a key another process just
        # created, and readers never see a half-written file.
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    except OSError as exc:
        raise KeyUnavailableError(
            f"cannot create {what} file {path} ({type(exc).__name__}): check the directory "
            "is writable by the worker user",
            ref=str(path),
        ) from exc
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def missing_file_error(path: Path, what: str) -> KeyUnavailableError:
    """Error for a key file that does not exist and may not be created."""
    return KeyUnavailableError(
        f"{what} file {path} does not exist: mount the key file at this path, or start "
        "with key creation enabled (create=True) for a new deployment",
        ref=str(path),
    )
