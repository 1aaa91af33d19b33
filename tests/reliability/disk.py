"""A small, size-limited directory to fill up: a tmpfs mounted with ``size=``.

Mounting needs root (true on this machine and in the CI container); elsewhere the caller skips
with the reason. ``fill`` leaves a chosen number of bytes free by writing one filler file, so a
test can make exactly the next adapter version not fit, then free the space again.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

FILLER = ".filler"  # a hidden name: the trainer's store ignores dot-entries at its root


class CannotMount(RuntimeError):
    pass


@contextmanager
def small_tmpfs(path: Path, size_bytes: int) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_bytes},mode=0755", "tmpfs", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise CannotMount(done.stderr.strip() or f"mount exited {done.returncode}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def fill(path: Path, leave_free: int) -> None:
    """Grow the filler until at most ``leave_free`` bytes remain free under ``path``."""
    chunk = b"\0" * 65536
    with (path / FILLER).open("ab") as f:
        while (room := free_bytes(path) - leave_free) > 0:
            try:
                f.write(chunk[: min(len(chunk), room)])
                f.flush()
            except OSError:
                break


def unfill(path: Path) -> None:
    (path / FILLER).unlink(missing_ok=True)


def tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())
