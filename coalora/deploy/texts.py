"""What ``predict`` and ``generate`` accept, checked before tokenizing: a list of strings (or of
(text, text) pairs for pair tasks). A tokenizer given ``None`` or integers fails with its own, unrelated
message; this says what to pass instead."""

from __future__ import annotations

from collections.abc import Sequence

from coalora.errors import CoaloraError

EXAMPLE = "e.g. predict(['a gripping film']) or, for pair tasks, predict([('premise', 'hypothesis')])"


def check_texts(texts: object) -> list[str | tuple[str, str]]:
    """``texts`` as a list of strings or string pairs; a single string is one text."""
    if isinstance(texts, str):
        return [texts]
    if not isinstance(texts, Sequence) or isinstance(texts, bytes):
        raise CoaloraError(f"predict takes a list of texts, got {type(texts).__name__}; {EXAMPLE}")
    if not texts:
        raise CoaloraError(f"predict got an empty list; pass at least one text, {EXAMPLE}")
    for i, text in enumerate(texts):
        pair = isinstance(text, (tuple, list)) and len(text) == 2 and all(isinstance(t, str) for t in text)
        if not (isinstance(text, str) or pair):
            raise CoaloraError(
                f"predict: item {i} is a {type(text).__name__} ({text!r:.40}), not a text; {EXAMPLE}"
            )
    return [t if isinstance(t, str) else (t[0], t[1]) for t in texts]
