"""Model directories in the model cache appear whole or not at all.

A builtin model is generated or converted once and then loaded by path, by this process or by
another trainer sharing the cache. It is written into a hidden directory beside its target and
renamed into place, so a reader never meets a half-written model; when two processes race, the
second rename fails and the first one's identical directory stands.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any


def save(target: Path, model: Any, tokenizer: Any) -> None:
    """Write ``model`` and ``tokenizer`` (``save_pretrained``) to ``target``, atomically."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            tmp.rename(target)
        except OSError:
            # Another process wrote it first; theirs is identical.
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
