"""Writing files and directories so that a reader never sees half of one: write beside, then rename.

Pure standard library; every writer of outputs (config.resolved.yaml, eval.json, report.html,
model/ and adapter/ directories, built models) goes through these.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path


def cache_dir() -> Path:
    """rayapp's cache on this machine: ``$RAYAPP_CACHE``, default ``~/.cache/rayapp`` (built models,
    output-store mirrors and downloads)."""
    root = Path(os.environ.get("RAYAPP_CACHE", Path.home() / ".cache" / "rayapp"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:  # a write that failed (a full disk) leaves no temporary file behind
        tmp.unlink(missing_ok=True)
    return path


def write_json_atomic(path: str | os.PathLike, data) -> Path:
    return write_text_atomic(path, json.dumps(data, indent=2, default=str) + "\n")


def replace_dir_atomic(out: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """``write(tmp)`` fills a fresh sibling directory, which then replaces ``out`` (the old one, if
    any, is moved aside first and removed last); if ``write`` fails, the sibling is removed and
    ``out`` is left as it was. Returns ``out``."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write(tmp)
    except BaseException:  # a write that failed (a full disk) leaves no half directory behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
    return out
