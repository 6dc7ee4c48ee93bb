"""A Hugging Face byte-level BPE tokenizer as llama.cpp's ``gpt2`` tokenizer metadata.

llama.cpp's ``gpt2`` tokenizer model is byte-level BPE: it splits text with a pre-tokenizer regex, maps
each piece's bytes to the same printable characters as Hugging Face's ``ByteLevel`` (``Ġ`` for a space),
and applies the merges by rank. So a ``tokenizers`` BPE model with a ``ByteLevel`` pre-tokenizer (the
GPT-2 regex, ``use_regex=True``) tokenizes the same in llama.cpp when the file holds its token list, its
merges, and ``tokenizer.ggml.pre = "gpt-2"`` (llama.cpp's name for that regex). Special tokens become
``CONTROL`` tokens (never produced from plain text, as in Hugging Face), other added tokens
``USER_DEFINED``; ids the tokenizer lacks up to the embedding's row count are padded with ``[PAD<id>]``
``UNUSED`` tokens, as llama.cpp's converter does (llama.cpp takes its vocabulary size from this list).

What llama.cpp cannot reproduce is reported, not hidden: it has no normalizers, so a ``Lowercase``
normalizer (the project's tiny LLaMA has one) means callers must lowercase text themselves; a tokenizer
that is not byte-level BPE (SentencePiece, WordPiece, byte fallback, ``ignore_merges``) is refused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from coalora.errors import CoaloraError

#: llama.cpp's token types (``llama_token_type`` / ``gguf.TokenType``)
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5
#: llama.cpp's name for the GPT-2 pre-tokenizer regex (``LLAMA_VOCAB_PRE_TYPE_GPT2``)
GPT2_PRE = "gpt-2"


@dataclass
class GGUFVocab:
    """Everything llama.cpp reads about a tokenizer (the ``tokenizer.ggml.*`` keys)."""

    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    special_ids: dict[str, int]
    add_bos: bool
    add_eos: bool
    model: str = "gpt2"
    pre: str = GPT2_PRE
    #: what llama.cpp will do differently from the Hugging Face tokenizer (empty when nothing)
    notes: list[str] = field(default_factory=list)

    def write(self, writer: Any) -> None:
        """Add the tokenizer keys to a ``gguf.GGUFWriter``."""
        writer.add_tokenizer_model(self.model)
        writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.token_types)
        writer.add_token_merges(self.merges)
        adders = {
            "bos": writer.add_bos_token_id,
            "eos": writer.add_eos_token_id,
            "unk": writer.add_unk_token_id,
            "pad": writer.add_pad_token_id,
        }
        for kind, token_id in self.special_ids.items():
            adders[kind](token_id)
        writer.add_add_bos_token(self.add_bos)
        writer.add_add_eos_token(self.add_eos)


def _backend_json(tokenizer: Any) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise CoaloraError(
            f"the gguf format needs a fast (tokenizers) tokenizer; got {type(tokenizer).__name__}"
        )
    return json.loads(backend.to_str())


def _byte_level(pre: dict | None) -> dict | None:
    """The ``ByteLevel`` step of a pre-tokenizer (possibly inside a ``Sequence``), or None."""
    if pre is None:
        return None
    if pre.get("type") == "ByteLevel":
        return pre
    if pre.get("type") == "Sequence" and len(pre.get("pretokenizers", [])) == 1:
        return _byte_level(pre["pretokenizers"][0])
    return None


def _check_model(spec: dict) -> tuple[dict, list[str]]:
    """The BPE model section after refusing what llama.cpp's ``gpt2`` tokenizer cannot do; the notes."""
    model = spec.get("model") or {}
    kind = model.get("type")
    byte_level = _byte_level(spec.get("pre_tokenizer"))
    if kind != "BPE" or byte_level is None or model.get("byte_fallback"):
        raise CoaloraError(
            f"the gguf format writes byte-level BPE tokenizers only (a BPE model with a ByteLevel "
            f"pre-tokenizer, as GPT-2's); this tokenizer is {kind} with pre-tokenizer "
            f"{(spec.get('pre_tokenizer') or {}).get('type')}"
            + (" and byte fallback" if model.get("byte_fallback") else "")
        )
    if model.get("ignore_merges"):
        raise CoaloraError("the tokenizer's BPE sets ignore_merges; llama.cpp's gpt-2 tokenizer does not")
    if not byte_level.get("use_regex", True):
        raise CoaloraError("the tokenizer's ByteLevel has use_regex=False; llama.cpp splits by the regex")
    notes = []
    if byte_level.get("add_prefix_space"):
        notes.append("ByteLevel add_prefix_space=True: llama.cpp adds no prefix space; prepend one to texts")
    normalizer = spec.get("normalizer")
    if normalizer is not None:
        steps = normalizer.get("normalizers", [normalizer])
        names = ", ".join(str(s.get("type")) for s in steps)
        notes.append(f"normalizer ({names}) is not applied by llama.cpp; normalize texts before tokenizing")
    return model, notes


def _merges(model: dict) -> list[str]:
    merges = []
    for merge in model.get("merges", []):
        pair = merge.split(" ") if isinstance(merge, str) else list(merge)
        if len(pair) != 2 or any(" " in part for part in pair):
            raise CoaloraError(f"BPE merge {merge!r} cannot be written as llama.cpp's 'left right' string")
        merges.append(" ".join(pair))
    return merges


def _adds(tokenizer: Any, token_id: int | None, first: bool) -> bool:
    """Whether the tokenizer puts ``token_id`` first (``first``) or last in an encoded text."""
    if token_id is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0 if first else -1] == token_id


def gguf_vocab(tokenizer: Any, vocab_size: int) -> GGUFVocab:
    """``tokenizer`` (a Hugging Face fast tokenizer) as llama.cpp tokenizer metadata for a model whose
    embedding has ``vocab_size`` rows; a one-line :class:`CoaloraError` for what llama.cpp cannot load."""
    spec = _backend_json(tokenizer)
    model, notes = _check_model(spec)
    vocab: dict[str, int] = tokenizer.get_vocab()
    if max(vocab.values(), default=-1) >= vocab_size:
        raise CoaloraError(
            f"the tokenizer has ids up to {max(vocab.values())}; the model's embedding has {vocab_size} rows"
        )
    tokens: list[str | None] = [None] * vocab_size
    types = [NORMAL] * vocab_size
    for token, token_id in vocab.items():
        tokens[token_id] = token
    for token_id, added in getattr(tokenizer, "added_tokens_decoder", {}).items():
        types[token_id] = CONTROL if added.special else USER_DEFINED
    for token_id, found in enumerate(tokens):
        if found is None:
            types[token_id] = UNUSED
    specials = {}
    for kind in ("bos", "eos", "unk", "pad"):
        special = getattr(tokenizer, f"{kind}_token_id", None)
        if special is not None:
            specials[kind] = int(special)
    return GGUFVocab(
        tokens=[f"[PAD{i}]" if t is None else t for i, t in enumerate(tokens)],
        token_types=types,
        merges=_merges(model),
        special_ids=specials,
        add_bos=_adds(tokenizer, specials.get("bos"), first=True),
        add_eos=_adds(tokenizer, specials.get("eos"), first=False),
        notes=notes,
    )


__all__ = ["GPT2_PRE", "GGUFVocab", "gguf_vocab"]
