"""Files written atomically: a temporary file in the same folder, fsync, then os.replace, so a
crash mid-write leaves either the old file or the new one, never a torn one.  A process killed
mid-write leaves its temporary file behind (``remove_stale_temps`` clears them), and a full disk
is reported as such, whichever library was writing."""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Callable, Collection
from pathlib import Path

# mkstemp's names: "." + target name + "." + 8 random characters + ".tmp"; save_checkpoint's link: ".last.pt.tmp".
TEMP_RE = re.compile(r"^\.(?P<target>.+)\.[a-z0-9_]{8}\.tmp$|^\.(?P<link>last\.[A-Za-z0-9]+)\.tmp$")
NO_SPACE_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
# torch.save reports a full disk as a RuntimeError of its zip writer, not as an OSError.
NO_SPACE_MESSAGES = ("No space left", "unexpected pos")
CHUNK = 16 << 20  # bytes read at a time when hashing a file


def _is_disk_full(err: BaseException) -> bool:
    if isinstance(err, OSError):
        return err.errno in NO_SPACE_ERRNOS
    return isinstance(err, RuntimeError) and any(m in str(err) for m in NO_SPACE_MESSAGES)


def read_json_config(path: Path) -> dict:
    """The object in the JSON file ``path`` ({} when it holds another JSON value); invalid JSON is one
    ``ValueError`` naming the file."""
    try:
        config = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err})") from None
    return config if isinstance(config, dict) else {}


def held_by(config: dict) -> str | None:
    """What a model folder's config.json says the folder holds: diffusers writes ``_class_name``, transformers
    ``model_type``; None where it says neither."""
    if config.get("_class_name"):
        return f"a diffusers {config['_class_name']}"
    if config.get("model_type"):
        return f"a transformers model of model_type {config['model_type']!r}"
    return None


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` and move the result onto ``path`` durably.  On any failure the
    temporary file is removed; a full disk (or quota) becomes one ``OSError(ENOSPC)`` naming ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        write(tmp)
        # after the write: mkstemp's 0600, which a writer may also set anew (safetensors' save_file does), would
        # make the file private to its writer
        os.chmod(tmp, 0o666 & ~umask)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if _is_disk_full(err):
            raise OSError(errno.ENOSPC, f"no space left on the device writing {path} "
                          "(free some space or choose another folder)") from err
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable where the OS allows it
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def remove_stale_temps(folder: str | Path, recursive: bool = False, targets: Collection[str] | None = None) -> list[Path]:
    """Delete the temporary files that ``atomic_write`` (and ``save_checkpoint``'s ``last`` link)
    leave in ``folder`` when a process is killed mid-write; returns what was removed.

    ``targets``: only the temporaries of these file names (e.g. the parts one process writes, so
    that it never removes a file another process is writing right now).  Call it where no other
    process writes the same files."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for p in sorted(folder.rglob("*") if recursive else folder.iterdir()):
        m = TEMP_RE.match(p.name)
        if m is None or not (p.is_symlink() or p.is_file()):
            continue
        if targets is not None and (m["target"] or m["link"]) not in targets:
            continue
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
            removed.append(p)
    return removed


def content_sha256(path: str | Path) -> str:
    """SHA-256 of what ``path`` holds: a file's bytes, or for a folder (a diffusers model) every
    file's relative path, size and bytes in sorted order.  Names the content, so that a file
    replaced by another model under the same name is told apart."""
    path = Path(path)
    h = hashlib.sha256()
    if path.is_dir():
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            h.update(f"{f.relative_to(path).as_posix()}\0{f.stat().st_size}\0".encode())
            _hash_file(f, h)
    else:
        _hash_file(path, h)
    return h.hexdigest()


def _hash_file(path: Path, h) -> None:
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)


def atomic_write_text(path: str | Path, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)

    atomic_write(path, write)


def atomic_save_npz(path: str | Path, **arrays) -> None:
    import numpy as np

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    atomic_write(path, write)
