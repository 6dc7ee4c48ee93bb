"""Checks every entry point runs on its inputs before doing any work: numbers inside their allowed range,
and output locations that can be written.

One :class:`Bound` describes what a numeric option accepts; the same object checks an argparse value
(:func:`arg`), a task or trainer argument (:func:`check_values`) and says, in the one-line error, what the
allowed range is. Output checks create nothing: a run that is refused leaves no folder behind. Imports
nothing of coalora but :mod:`coalora.errors`, so every room may use it.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from coalora.errors import CoaloraError


@dataclass(frozen=True)
class Bound:
    """The numbers an option accepts: an integer or a finite float in [low, high] (either end open)."""

    low: float | None = None
    high: float | None = None
    integer: bool = False
    #: the end itself is excluded (``lr > 0`` rather than ``lr >= 0``)
    open_low: bool = False
    open_high: bool = False
    #: None is accepted (an option that is off unless set)
    optional: bool = False

    def describe(self) -> str:
        """The allowed values in words: 'an integer >= 1', 'a number in [0, 1)'."""
        kind = "an integer" if self.integer else "a number"
        low, high = _text(self.low), _text(self.high)
        if self.low is not None and self.high is not None:
            if self.integer and not (self.open_low or self.open_high):
                return f"{kind} from {low} to {high}"
            left, right = "(" if self.open_low else "[", ")" if self.open_high else "]"
            return f"{kind} in {left}{low}, {high}{right}"
        prefix = f"{kind} " if self.integer else ""  # 'must be >= 0' reads as a number already
        if self.low is not None:
            return f"{prefix}{'>' if self.open_low else '>='} {low}"
        if self.high is not None:
            return f"{prefix}{'<' if self.open_high else '<='} {high}"
        return f"{kind}" if self.integer else "a finite number"

    def problem(self, value: object) -> str | None:
        """Why ``value`` is refused (None: accepted)."""
        if value is None:
            return None if self.optional else "is required"
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"must be {self.describe()}"
        if self.integer and (isinstance(value, float) and not value.is_integer()):
            return f"must be {self.describe()}"
        number = float(value)
        if not math.isfinite(number):
            return f"must be {self.describe()}"
        too_low = self.low is not None and (number <= self.low if self.open_low else number < self.low)
        too_high = self.high is not None and (number >= self.high if self.open_high else number > self.high)
        return f"must be {self.describe()}" if too_low or too_high else None

    def check(self, name: str, value: Any, fix: str = "") -> Any:
        """``value`` if accepted, else a one-line :class:`CoaloraError` naming the range."""
        problem = self.problem(value)
        if problem is not None:
            raise CoaloraError(f"{name} {problem}, got {value!r}; {fix or 'pass a value in that range'}")
        return int(value) if self.integer and value is not None else value


def _text(number: float | None) -> str:
    return "" if number is None else f"{number:g}"


COUNT = Bound(0, integer=True)
POSITIVE_INT = Bound(1, integer=True)
POSITIVE = Bound(0, open_low=True)
NON_NEGATIVE = Bound(0)
SEED = Bound(0, 2**32 - 1, integer=True)
FINITE = Bound()


def arg(bound: Bound) -> Callable[[str], float | int]:
    """An argparse ``type=`` that parses a number and checks it against ``bound``."""

    def parse(text: str) -> float | int:
        try:
            value: float | int = int(text) if bound.integer else float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {bound.describe()}, got '{text}'") from None
        problem = bound.problem(value)
        if problem is not None:
            raise argparse.ArgumentTypeError(f"{problem}, got {text}")
        return value

    parse.__name__ = bound.describe()  # argparse names the type in some messages
    return parse


def check_values(values: Mapping[str, Any], bounds: Mapping[str, Bound], prefix: str = "") -> None:
    """Check every ``values[name]`` that ``bounds`` knows (lists element by element)."""
    for name, bound in bounds.items():
        if name not in values:
            continue
        value = values[name]
        if isinstance(value, (list, tuple)):  # an empty list is "none" (e.g. no evaluation budgets)
            for item in value:
                bound.check(f"{prefix}{name}", item)
        else:
            bound.check(f"{prefix}{name}", value)


def nearest_existing(path: Path) -> Path:
    """``path`` or its closest ancestor that exists."""
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _check_writable(folder: Path, target: Path, what: str) -> None:
    """The closest existing path at or above ``folder`` must be a folder we may write in."""
    ancestor = nearest_existing(folder)
    if not ancestor.is_dir():
        raise CoaloraError(
            f"{what} '{target}' is under '{ancestor}', which is a file; choose another location"
        )
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise CoaloraError(f"{what} '{target}' cannot be written: '{ancestor}' is read-only; choose another")


def check_output_dir(path: str | os.PathLike, what: str = "output folder") -> Path:
    """A folder that exists, or can be created, and can be written to; nothing is created here."""
    path = Path(path).expanduser()
    if str(path) == "":
        raise CoaloraError(f"{what} is empty; give a folder")
    if path.exists() and not path.is_dir():
        raise CoaloraError(f"{what} '{path}' exists and is a file, not a folder; choose another or remove it")
    _check_writable(path, path, what)
    return path


def check_output_file(path: str | os.PathLike, what: str = "output file") -> Path:
    """A file that can be (re)written: not a folder, under a writable folder; nothing is created here."""
    path = Path(path).expanduser()
    if str(path) in ("", "."):
        raise CoaloraError(f"{what} is empty; give a file name")
    if path.is_dir():
        raise CoaloraError(f"{what} '{path}' is a folder; give a file name (e.g. {path / 'config.json'})")
    _check_writable(path.parent, path, what)
    if path.exists() and not os.access(path, os.W_OK):
        raise CoaloraError(f"{what} '{path}' is read-only; choose another or make it writable")
    return path


def check_input_files(paths: Iterable[str | os.PathLike], what: str, fix: str) -> list[Path]:
    """Every path is an existing file (a folder or a missing path is one line naming it)."""
    found = []
    for raw in paths:
        path = Path(raw).expanduser()
        if path.is_dir():
            raise CoaloraError(f"{what} '{path}' is a folder, not a file; {fix}")
        if not path.is_file():
            raise CoaloraError(f"{what} '{path}' does not exist; {fix}")
        found.append(path)
    return found
