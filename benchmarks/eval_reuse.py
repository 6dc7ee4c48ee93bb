"""Reuse a run's ``eval.json`` only when it was written by the same evaluation (issue #23).

``compare_methods.py`` and ``lm_compare.py`` skip an evaluation whose ``eval.json`` exists. Without a key a
changed precision, budget list, eval limit or qconfig file silently reused the old numbers. The key is what
the numbers depend on besides the code: the evaluate flags, the checkpoint's bytes and the bytes of every
file a flag names (the qconfig files). It is written beside ``eval.json`` once an evaluation succeeds.

An ``eval.json`` without a key is not reused: nothing records which flags wrote it, and reusing one written
under other flags is the defect this module removes. Re-evaluating costs minutes; a wrong cell costs more.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

KEY_FILE = "eval_key.json"
RESULT_FILE = "eval.json"
REPO = Path(__file__).resolve().parents[1]
_CHUNK = 1 << 20


def file_sha256(path: str | Path) -> str:
    """The content hash of a file: a retrained checkpoint or an edited qconfig file changes it."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _portable(flag: str) -> str:
    """A path inside the repository relative to it, so a checkout elsewhere keeps its keys."""
    path = Path(flag)
    if path.is_absolute() and path.is_relative_to(REPO):
        return str(path.relative_to(REPO))
    return flag


def evaluation_key(ckpt: str | Path, flags: list[str]) -> dict:
    """What an evaluation's numbers depend on besides the code: flags, checkpoint and named files."""
    files = {_portable(flag): file_sha256(flag) for flag in flags if Path(flag).is_file()}
    return {
        "flags": [_portable(flag) for flag in flags],
        "ckpt_sha256": file_sha256(ckpt),
        "files_sha256": files,
    }


def stored_key(folder: Path) -> dict | None:
    """The key an earlier evaluation in ``folder`` was written with, or None (absent or unreadable)."""
    try:
        return json.loads((folder / KEY_FILE).read_text())
    except (OSError, ValueError):
        return None


def reusable(folder: Path, key: dict) -> bool:
    """True when ``folder`` holds an eval.json written under exactly ``key``."""
    return (folder / RESULT_FILE).is_file() and stored_key(folder) == json.loads(json.dumps(key))


def evaluate_once(folder: Path, ckpt: str | Path, flags: list[str], run: Callable[[], None]) -> list[dict]:
    """The ``results`` of ``folder/eval.json``, running ``run`` first unless it was written under the same
    flags, checkpoint and files. ``run`` must write ``folder/eval.json`` or raise."""
    key = evaluation_key(ckpt, flags)
    if not reusable(folder, key):
        (folder / KEY_FILE).unlink(missing_ok=True)  # an interrupted rerun must not look finished
        run()
        folder.mkdir(parents=True, exist_ok=True)
        (folder / KEY_FILE).write_text(json.dumps(key, indent=1) + "\n")
    return json.loads((folder / RESULT_FILE).read_text())["results"]
