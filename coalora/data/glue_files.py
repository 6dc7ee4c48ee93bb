"""GLUE files: finding a task's split in a local folder, reading it in every common layout, or the hub.

Three layouts are read, detected from the file itself:

* the original GLUE download (``glue_data/SST-2/train.tsv``): tab-separated with *no* quoting, task-specific
  headers (CoLA has none) and string labels for QNLI/RTE/MNLI;
* a Hugging Face export (``sst2/train.tsv``): HF column names, CSV quoting, integer labels;
* ``stsa.binary.*`` sentence files: ``label<SPACE>sentence`` per line.
"""

from __future__ import annotations

import csv
import io
import os
import re
from pathlib import Path
from typing import Literal

from coalora.data.glue import HUB_DATASET, HUB_SPLITS, Row, TaskSpec, get_task, split_name
from coalora.errors import CoaloraError


def default_glue_dir() -> Path | None:
    """``$GLUE_DIR`` if set (even if wrong, so the user hears of it), else ``../shared/data`` if present."""
    env = os.environ.get("GLUE_DIR")
    if env:
        return Path(env).expanduser()
    shared = Path.cwd().parent / "shared" / "data"
    return shared.resolve() if shared.is_dir() else None


def find_task_dir(glue_dir: str | Path, task: str) -> Path:
    """The task's folder under ``glue_dir``: the original (``SST-2``) or HF (``sst2``) name, any case."""
    spec = get_task(task)
    root = Path(glue_dir).expanduser()
    if not root.is_dir():
        raise CoaloraError(
            f"GLUE data folder {root} does not exist; set GLUE_DIR or glue_dir to the folder holding the "
            "task folders (SST-2/ or sst2/ ...)"
        )
    wanted = (spec.original.folder, spec.name)
    lowered = {w.lower() for w in wanted}
    for child in sorted(root.iterdir()):
        if child.is_dir() and child.name.lower() in lowered:
            return child
    raise CoaloraError(
        f"no folder for task '{spec.name}' in {root} (tried {', '.join(wanted)}, any case); "
        "add the task's files there or point GLUE_DIR / glue_dir elsewhere"
    )


def find_split_file(glue_dir: str | Path, task: str, split: str = "train") -> Path:
    """The file of one split: ``<split>.tsv`` or its HF-named twin (``validation.tsv`` for ``dev``)."""
    spec = get_task(task)
    ours = split_name(spec, split)
    folder = find_task_dir(glue_dir, spec.name)
    names = list(dict.fromkeys((f"{ours}.tsv", f"{HUB_SPLITS[ours]}.tsv")))
    for name in names:
        if (folder / name).is_file():
            return folder / name
    raise CoaloraError(
        f"no {ours} split for task '{spec.name}' in {folder} (tried {', '.join(names)}); "
        "add the file or point GLUE_DIR / glue_dir at a complete copy"
    )


_SENTENCE_LINE = re.compile(r"(-?\d+(?:\.\d+)?) (.*)")

#: a CSV-quoted first field ("...""..."<TAB>): tells an HF export from an original file with the same header.
_QUOTED_FIRST_FIELD = re.compile(r'^"(?:[^"\n]|"")*"\t', re.MULTILINE)


def _parse_label(value: str, spec: TaskSpec, where: str) -> int | float:
    """A label as the HF id (or float score), from an integer or a label name such as `entailment`."""
    text = value.strip()
    try:
        if spec.is_regression:
            return float(text)
        if text in spec.label_names:
            return spec.label_names.index(text)
        label = int(text)
        if 0 <= label < spec.num_labels:
            return label
    except ValueError:
        pass
    expected = (
        "a number" if spec.is_regression else f"0..{spec.num_labels - 1} or {', '.join(spec.label_names)}"
    )
    raise CoaloraError(
        f"{where}: cannot parse label '{text}' for task '{spec.name}' (expected {expected}); "
        "fix or drop that row"
    )


def _read_sentences(text: str, path: Path, spec: TaskSpec) -> list[Row]:
    """``label sentence`` lines (the stsa.binary files)."""
    if len(spec.text_fields) != 1:
        raise CoaloraError(
            f"{path} is a 'label sentence' file but task '{spec.name}' needs sentence pairs; "
            "use a tab-separated GLUE file"
        )
    rows: list[Row] = []
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        match = _SENTENCE_LINE.fullmatch(line.rstrip("\r"))
        if match is None:
            raise CoaloraError(f"{path} line {number} is not 'label sentence'; fix that line")
        label = _parse_label(match[1], spec, f"{path} line {number}")
        rows.append({spec.text_fields[0]: match[2], "label": label})
    return rows


def _missing_columns_error(path: Path, missing: list[str], header: list[str]) -> CoaloraError:
    return CoaloraError(
        f"{path} lacks column {', '.join(repr(c) for c in missing)} "
        f"(found: {', '.join(header) or 'nothing'}); use the original GLUE or Hugging Face export layout"
    )


def _choose_layout(text: str, header: list[str], path: Path, spec: TaskSpec) -> str:
    """``original`` or ``hf`` from the header; an exact tie (``sentence label``) is settled by quoting."""
    hf_missing = [c for c in (*spec.text_fields, "label") if c not in header]
    if spec.original.names:  # headerless original (CoLA): any file without the HF header is one
        return "hf" if not hf_missing else "original"
    layout = spec.original
    orig_missing = [c for c in (*layout.text_columns, layout.label_column) if c not in header]
    if not orig_missing and not hf_missing:
        if "index" in header:
            return "original"
        if "idx" in header:
            return "hf"
        return "hf" if _QUOTED_FIRST_FIELD.search(text) else "original"
    if not orig_missing:
        return "original"
    if not hf_missing:
        return "hf"
    raise _missing_columns_error(path, min(hf_missing, orig_missing, key=len), header)


def _read_table(text: str, path: Path, spec: TaskSpec) -> list[Row]:
    """A tab-separated file in the original or HF layout."""
    first = text.partition("\n")[0].rstrip("\r")
    header = first.split("\t")
    layout = _choose_layout(text, header, path, spec)
    quoting: Literal[0, 1, 2, 3]
    if layout == "hf":
        quoting, columns, label_column, label_last = csv.QUOTE_MINIMAL, spec.text_fields, "label", False
    else:
        quoting, columns = csv.QUOTE_NONE, spec.original.text_columns
        label_column, label_last = spec.original.label_column, spec.original.label_last
    reader = csv.reader(io.StringIO(text), delimiter="\t", quoting=quoting)
    headerless = layout == "original" and bool(spec.original.names)
    header = list(spec.original.names) if headerless else next(reader)
    positions = [header.index(c) for c in columns]
    label_at = -1 if label_last else header.index(label_column)
    needed = len(header) if label_last else max(*positions, label_at) + 1
    rows: list[Row] = []
    for fields in reader:
        if not fields or fields == [""]:
            continue
        where = f"{path} line {reader.line_num}"
        if len(fields) < needed:
            raise CoaloraError(
                f"{where} has {len(fields)} fields, expected at least {needed}; "
                "the row is broken or the file is not tab-separated"
            )
        row: Row = {name: fields[at] for name, at in zip(spec.text_fields, positions, strict=True)}
        row["label"] = _parse_label(fields[label_at], spec, where)
        rows.append(row)
    return rows


def read_rows(path: str | Path, task: str) -> list[Row]:
    """Every labelled row of one file, its layout detected from the first line."""
    spec = get_task(task)
    path = Path(path).expanduser()
    if not path.is_file():
        raise CoaloraError(f"data file {path} does not exist; check the path")
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: the original MRPC files start with a BOM
    except UnicodeDecodeError as err:
        raise CoaloraError(f"{path} is not UTF-8 text ({err.reason}); re-save it as UTF-8") from err
    first = text.partition("\n")[0].rstrip("\r")
    if "\t" not in first and _SENTENCE_LINE.fullmatch(first):
        return _read_sentences(text, path, spec)
    return _read_table(text, path, spec)


def read_split(glue_dir: str | Path, task: str, split: str = "train") -> list[Row]:
    """One split of a task from a local GLUE folder."""
    return read_rows(find_split_file(glue_dir, task, split), task)


def load_hub_split(task: str, split: str = "train") -> list[Row]:
    """One split from the Hugging Face hub (``nyu-mll/glue``), as rows like the local readers give."""
    spec = get_task(task)
    hub_split = HUB_SPLITS[split_name(spec, split)]
    try:
        from datasets import load_dataset

        dataset = load_dataset(HUB_DATASET, spec.name, split=hub_split)
    except Exception as err:  # offline, hub down, cache missing: datasets raises many types
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CoaloraError(
            f"cannot load GLUE '{spec.name}' from the Hugging Face hub ({reason}); "
            "set GLUE_DIR or glue_dir to a local GLUE folder"
        ) from err
    columns = dataset.to_dict()
    cast = float if spec.is_regression else int
    texts = [columns[name] for name in spec.text_fields]
    return [
        {**dict(zip(spec.text_fields, values, strict=True)), "label": cast(label)}
        for *values, label in zip(*texts, columns["label"], strict=True)
    ]


def resolve_source(source: str, glue_dir: str | Path | None) -> tuple[str, Path | None]:
    """``(local|hub, folder)``: ``auto`` means local when a GLUE folder is given or found, else the hub."""
    if source not in ("auto", "local", "hub"):
        raise CoaloraError(f"unknown data source '{source}'; choose auto, local or hub")
    folder = Path(glue_dir).expanduser() if glue_dir else default_glue_dir()
    if source == "auto":
        source = "local" if folder is not None else "hub"
    if source == "local" and folder is None:
        raise CoaloraError("no GLUE data folder found; set GLUE_DIR or glue_dir, or use source=hub")
    return source, folder


def load_split(
    task: str, split: str = "train", glue_dir: str | Path | None = None, source: str = "auto"
) -> list[Row]:
    """One split from wherever ``source`` says (see :func:`resolve_source`)."""
    kind, folder = resolve_source(source, glue_dir)
    if kind == "hub":
        return load_hub_split(task, split)
    assert folder is not None
    return read_split(folder, task, split)
