"""Small helpers every room uses: thread limits, quiet transformers, one-line error text, budget labels,
the cache folder, atomic writes and the model inputs taken from tokenizer output. Imports nothing of
coalora, so every room may use it."""

from __future__ import annotations

import contextlib
import inspect
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch


@contextlib.contextmanager
def intra_op_threads(count: int | None) -> Iterator[None]:
    """Limit torch's CPU threads to ``count`` for the block (None: leave them as they are).

    Quantizing, GP fitting and candidate search are chains of short ops that gain little from a second
    thread, and OpenMP's barriers make them many times slower whenever another process holds a core.
    """
    if count is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' load reports and progress bars (e.g. 'classifier newly initialised')."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def first_line(err: BaseException) -> str:
    """An exception's first line (or its type's name): errors we wrap must stay one line."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def one_line(err: BaseException) -> str:
    """An exception's whole message folded onto one line (for messages we wrote, which may wrap)."""
    text = " ".join(str(err).split())
    return text or type(err).__name__


def budget_label(budget: float, decimals: int = 2) -> str:
    """A budget as text: 3 -> '3.0', 2.25 -> '2.25', 2.35 -> '2.35'.

    Metric names use two decimals (``val/accuracy@3.0``); ``coalora allocate`` names files with four
    (``2.125bits.json``).
    """
    text = f"{budget:.{decimals}f}".rstrip("0")
    return text + "0" if text.endswith(".") else text


def default_cache_dir() -> Path:
    """``$COALORA_CACHE`` if set, else ``~/.cache/coalora`` (error tables, allocations, Fisher)."""
    env = os.environ.get("COALORA_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "coalora"


def _temporary_sibling(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def save_atomic(obj: object, path: Path) -> None:
    """``torch.save`` through a temporary file and ``os.replace``, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_sibling(path)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary sibling of ``path`` to write; moved onto ``path`` if the block succeeds, else deleted,
    so readers never see half a file (for writers that want a file name: savefig, CSV, JSON)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_sibling(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary sibling and ``os.replace``."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU does bf16 arithmetic in hardware (AVX512-BF16 or AMX tiles).

    Without either, oneDNN emulates bf16: a MiniLM training step under bf16 autocast took 22-24x the fp32
    step on a 2-core AVX2 EPYC (docs/results.md), so the demo trains in fp32 there and ``fit`` warns.
    An unknown answer (torch without these probes) counts as native: nothing changes then.
    """
    probes = [
        getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    ]
    if all(probe is None for probe in probes):
        return True
    return any(bool(probe()) for probe in probes if probe is not None)


#: the parameters each module class's ``forward`` names (None: it names none), filled on first use
_FORWARD_NAMES: dict[type[torch.nn.Module], frozenset[str] | None] = {}


def _forward_names(cls: type[torch.nn.Module]) -> frozenset[str] | None:
    """The parameters ``cls.forward`` names (None: it names none, a wrapper handing ``**kwargs`` on)."""
    if cls not in _FORWARD_NAMES:
        named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        parameters = list(inspect.signature(cls.forward).parameters.values())[1:]  # without self
        _FORWARD_NAMES[cls] = frozenset(p.name for p in parameters if p.kind in named) or None
    return _FORWARD_NAMES[cls]


def model_inputs(model: torch.nn.Module, encoding: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of a tokenizer output (or a collated batch) that ``model``'s forward names, unchanged.

    A signature check alone is not enough: decoders such as LLaMA take ``**kwargs``, so a WordPiece
    tokenizer's ``token_type_ids`` would pass it, and ``generate`` then refuses them; only explicitly
    named parameters are kept (BERT names ``token_type_ids``). ``labels`` are never passed: callers
    compute their own loss. A forward that names nothing (a wrapper) gets every other entry.
    """
    names = _forward_names(type(model))
    return {k: v for k, v in encoding.items() if k != "labels" and (names is None or k in names)}
