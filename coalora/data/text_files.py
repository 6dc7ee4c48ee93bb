"""Documents for language modelling: local text files, or a streamed hub corpus (the paper's C4).

Local sources are a folder (every supported file in it, sorted by name) or explicit paths:

- ``.txt``: documents separated by blank lines, the lines of a document joined with newlines (WikiText's
  paragraphs and ``= Title =`` lines each become one document);
- ``.jsonl``, ``.json`` (one object per line, or a list of objects), optionally gzipped (``.jsonl.gz``,
  ``.json.gz``: C4's own file format): every object's ``text`` field is one document.

The hub path is the real ``load_dataset(name, config, split=..., streaming=True)``, cut to
``max_documents``; offline it fails with a one-line error that points at local files.
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from coalora.errors import CoaloraError

SUFFIXES = (".txt", ".jsonl", ".json", ".jsonl.gz", ".json.gz")
TEXT_FIELD = "text"


def _suffix(path: Path) -> str | None:
    name = path.name.lower()
    return next((s for s in sorted(SUFFIXES, key=len, reverse=True) if name.endswith(s)), None)


def expand_paths(sources: Sequence[str | os.PathLike], data_dir: Path | None = None) -> list[Path]:
    """Every file that ``sources`` name: a folder's supported files (sorted) or the file itself.

    A relative path that does not exist from the working directory is looked up in ``data_dir`` (so a
    config can say ``wikitext-2/valid.txt`` and find it in the shared data folder).
    """
    files: list[Path] = []
    for source in sources:
        path = Path(source).expanduser()
        if (
            not path.exists()
            and not path.is_absolute()
            and data_dir is not None
            and (data_dir / path).exists()
        ):
            path = data_dir / path
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and _suffix(p) is not None)
            if not found:
                raise CoaloraError(f"folder {path} holds no text files ({', '.join(SUFFIXES)}); add some")
            files += found
        elif path.is_file():
            if _suffix(path) is None:
                raise CoaloraError(
                    f"{path} is not a text file this reader knows; use one of {', '.join(SUFFIXES)}"
                )
            files.append(path)
        else:
            where = f" (nor in {data_dir})" if data_dir is not None and not path.is_absolute() else ""
            raise CoaloraError(f"text file {source} does not exist{where}; check the path or set GLUE_DIR")
    return files


def _paragraphs(text: str) -> list[str]:
    documents, current = [], []
    for line in text.splitlines():
        if line.strip():
            current.append(line.strip())
        elif current:
            documents.append("\n".join(current))
            current = []
    if current:
        documents.append("\n".join(current))
    return documents


def _json_records(text: str, path: Path) -> Iterable[tuple[int, object]]:
    stripped = text.lstrip()
    if stripped.startswith("["):  # one JSON list of objects
        try:
            records = json.loads(text)
        except json.JSONDecodeError as err:
            raise CoaloraError(
                f"{path} is not valid JSON ({err.msg}, line {err.lineno}); fix the file"
            ) from None
        yield from enumerate(records, start=1)
        return
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as err:
            raise CoaloraError(
                f"{path} line {number} is not a JSON object ({err.msg}); write one object per line"
            ) from None


def read_file(path: Path) -> list[str]:
    """The documents of one file (see the module docstring for the formats)."""
    suffix = _suffix(path)
    try:
        raw = gzip.decompress(path.read_bytes()) if suffix and suffix.endswith(".gz") else path.read_bytes()
        text = raw.decode("utf-8")
    except (OSError, UnicodeDecodeError, EOFError) as err:
        raise CoaloraError(
            f"cannot read {path} as UTF-8 text ({type(err).__name__}); check the file"
        ) from None
    if suffix == ".txt":
        return _paragraphs(text)
    documents = []
    for number, record in _json_records(text, path):
        if not isinstance(record, dict) or TEXT_FIELD not in record:
            raise CoaloraError(
                f"{path} record {number} has no '{TEXT_FIELD}' field; "
                f"every object needs a '{TEXT_FIELD}' string"
            )
        value = record[TEXT_FIELD]
        if not isinstance(value, str):
            raise CoaloraError(
                f"{path} record {number}: '{TEXT_FIELD}' is a {type(value).__name__}, not a string"
            )
        if value.strip():
            documents.append(value)
    return documents


def read_documents(sources: Sequence[str | os.PathLike], data_dir: Path | None = None) -> list[str]:
    """Every document of ``sources``, in order; an empty corpus is an error."""
    files = expand_paths(sources, data_dir)
    documents = [doc for path in files for doc in read_file(path)]
    if not documents:
        raise CoaloraError(f"no text in {', '.join(map(str, files))}; the corpus is empty")
    return documents


def stream_hub_documents(name: str, config: str | None, split: str, max_documents: int) -> list[str]:
    """The first ``max_documents`` documents of a hub corpus, streamed (C4 is far too large to download)."""
    try:
        from datasets import load_dataset

        stream = load_dataset(name, config, split=split, streaming=True)
        documents = []
        for record in stream:
            documents.append(record[TEXT_FIELD])
            if len(documents) >= max_documents:
                break
    except Exception as err:  # offline: connection, file-not-found and hub errors alike
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CoaloraError(
            f"cannot stream {name} ({config}) {split} from the hub ({first[:160]}); "
            "pass local text files (train_files / val_files) instead"
        ) from None
    if not documents:
        raise CoaloraError(f"{name} ({config}) {split} is empty on the hub; pick another split")
    return documents
