"""Quantization configurations: one option per target matrix, their cost, encoding and JSON files (SPEC §2.4).

:class:`ConfigSpace` binds configurations to one backbone's target matrices; everything that needs the
matrices' sizes (avg bits, validation, the search's integer encoding) goes through it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from coalora.errors import CoaloraError
from coalora.pretrained import resolve_model_path
from coalora.quant.families import CodeFamily, get_family
from coalora.quant.options import OPTION_SPACE, QuantOption
from coalora.quant.targets import TargetMatrix
from coalora.utils import write_text_atomic

FORMAT = "coalora.qconfig/1"


@dataclass(frozen=True)
class QConfig:
    """A quantization configuration: module name -> option (the code family's: a :class:`QuantOption` for
    nf/int, a ``GGUFOption`` for gguf), in the backbone's target order."""

    matrices: Mapping[str, Any]
    model: str = ""
    #: the ``avg_bits`` a file's header states (checked against the matrices by ConfigSpace.validate)
    declared_bits: float | None = field(default=None, compare=False)

    def __hash__(self) -> int:
        return hash(tuple(self.matrices.items()))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, QConfig) and tuple(self.matrices.items()) == tuple(other.matrices.items())

    def to_json(self, avg_bits: float | None = None) -> dict:
        data: dict = {"format": FORMAT, "model": self.model}
        if avg_bits is not None:
            data["avg_bits"] = round(avg_bits, 6)
        data["matrices"] = {name: option.to_dict() for name, option in self.matrices.items()}
        return data

    @classmethod
    def from_json(cls, data: object, where: str = "qconfig", family: str = "nf") -> QConfig:
        """Parse a qconfig's JSON form; each matrix's option in ``family``'s schema."""
        if not isinstance(data, dict):
            raise CoaloraError(f"{where} must be a JSON object with 'format', 'model' and 'matrices'")
        if data.get("format") != FORMAT:
            raise CoaloraError(f"{where} has format {data.get('format')!r}; expected '{FORMAT}'")
        unknown = sorted(set(data) - {"format", "model", "avg_bits", "matrices"})
        if unknown:
            raise CoaloraError(
                f"{where} has unknown key(s) {unknown}; allowed: format, model, avg_bits, matrices"
            )
        matrices = data.get("matrices")
        if not isinstance(matrices, dict) or not matrices:
            raise CoaloraError(f"{where} needs a non-empty 'matrices' object mapping module names to options")
        parse = get_family(family).option_from_dict
        options = {name: parse(opt, where=f"{where}: matrix '{name}'") for name, opt in matrices.items()}
        declared = data.get("avg_bits")
        if declared is not None and (isinstance(declared, bool) or not isinstance(declared, (int, float))):
            raise CoaloraError(f"{where} has avg_bits {declared!r}, not a number; fix it or remove the key")
        return cls(matrices=options, model=str(data.get("model", "")), declared_bits=declared)

    def save(self, path: str | os.PathLike, avg_bits: float | None = None) -> None:
        """Write atomically, so a failed write never leaves half a file."""
        write_text_atomic(Path(path), json.dumps(self.to_json(avg_bits), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike, family: str = "nf") -> QConfig:
        path = Path(path)
        if not path.is_file():
            raise CoaloraError(
                f"qconfig file '{path}' does not exist; write one with `coalora allocate --out`"
            )
        try:
            data = json.loads(path.read_text())
        except UnicodeDecodeError:
            raise CoaloraError(
                f"qconfig file '{path}' is not text (binary data); write one with `coalora allocate --out`"
            ) from None
        except json.JSONDecodeError as err:
            raise CoaloraError(
                f"qconfig file '{path}' is not valid JSON ({err.msg} at line {err.lineno}); "
                "fix it or write one with `coalora allocate --out`"
            ) from None
        return cls.from_json(data, where=f"qconfig '{path}'", family=family)


def _same_model(a: str, b: str) -> bool:
    if not a or not b:
        return True
    return a == b or resolve_model_path(a) == resolve_model_path(b)


class ConfigSpace:
    """All configurations of one backbone: cost, validation and the (N, 5) integer encoding."""

    def __init__(self, targets: Iterable[TargetMatrix], model: str = "", family: str = "nf") -> None:
        """``family``: the code family whose option schema, encoding and cost the configurations use."""
        self.targets = list(targets)
        self.model = model
        self.family_name = family
        self.family  # noqa: B018  (an unknown family fails here, in one line)
        self.names = [t.name for t in self.targets]
        self._index = {name: i for i, name in enumerate(self.names)}
        self.numel = torch.tensor([t.numel for t in self.targets], dtype=torch.float64)
        self.total_numel = int(self.numel.sum())
        #: storage bits of every option, in the family's option-space order
        self.option_bits = torch.tensor(
            [self.family.bits_per_weight(o) for o in self.family.option_space], dtype=torch.float64
        )

    @property
    def family(self) -> CodeFamily:
        """The code family object (looked up by name, so a pickled space holds only the name)."""
        return get_family(getattr(self, "family_name", "nf"))

    def __len__(self) -> int:
        return len(self.targets)

    # -- which options fit which matrix ---------------------------------------------------------------
    @cached_property
    def option_mask(self) -> torch.Tensor:
        """(N, K) bool: whether option k of the family's space can code target i (its row length); all
        True for the blocked families, K-quants only on rows of multiples of 256 for ``gguf``."""
        family = self.family
        mask = torch.tensor(
            [[family.allowed(o, t.in_features) for o in family.option_space] for t in self.targets],
            dtype=torch.bool,
        ).reshape(len(self.targets), len(family.option_space))
        for target, row in zip(self.targets, mask, strict=True):
            if not row.any():
                raise CoaloraError(
                    f"no {family.name} option codes target '{target.name}' (rows of {target.in_features} "
                    "weights); use code_family nf or int"
                )
        return mask

    @cached_property
    def nearest_allowed_index(self) -> torch.Tensor:
        """(N, K) long: per target, the allowed option nearest to each option index (the cheaper on a tie;
        itself where allowed)."""
        table = torch.empty(self.option_mask.shape, dtype=torch.long)
        for i, row in enumerate(self.option_mask.tolist()):
            allowed = [k for k, ok in enumerate(row) if ok]
            for k in range(len(row)):
                table[i, k] = min(allowed, key=lambda a, k=k: (abs(a - k), a))  # type: ignore[misc]
        return table

    def restrict(self, encoded: torch.Tensor) -> torch.Tensor:
        """(..., N, F) encodings with each option a target's rows do not allow moved to the nearest allowed
        one (:attr:`nearest_allowed_index`); returned as given when every option fits every target."""
        if bool(self.option_mask.all()):
            return encoded
        if len(self.family.field_names) != 1:
            raise CoaloraError(
                f"code family '{self.family_name}' restricts options per matrix but has several fields; "
                "the search moves single-field options only"
            )
        index = encoded[..., 0].long()
        rows = torch.arange(len(self)).expand_as(index)
        return self.nearest_allowed_index[rows, index].unsqueeze(-1).to(encoded.dtype)

    def budget_range(self) -> tuple[float, float]:
        """Cheapest and dearest avg_bits this backbone can take (each target's cheapest or dearest allowed
        option)."""
        bits = self.option_bits.expand(self.option_mask.shape)
        low = torch.where(self.option_mask, bits, torch.inf).min(dim=1).values
        high = torch.where(self.option_mask, bits, -torch.inf).max(dim=1).values
        return float((low * self.numel).sum() / self.total_numel), float(
            (high * self.numel).sum() / self.total_numel
        )

    @property
    def dim(self) -> int:
        """Length of the flat encoding: 5 option indices per matrix."""
        return len(self) * len(self.family.field_names)

    # -- construction -------------------------------------------------------------------------------
    def make(self, options: Iterable[Any]) -> QConfig:
        options = list(options)
        if len(options) != len(self):
            raise CoaloraError(f"got {len(options)} options for {len(self)} target matrices")
        return QConfig(dict(zip(self.names, options, strict=True)), model=self.model)

    def uniform(self, option: Any) -> QConfig:
        return self.make([option] * len(self))

    def random(self, generator: torch.Generator | None = None) -> QConfig:
        """Each target's option uniform among those its rows allow."""
        space = self.family.option_space
        if bool(self.option_mask.all()):
            picks = torch.randint(len(space), (len(self),), generator=generator)
            return self.make(space[int(i)] for i in picks)
        options = []
        for row in self.option_mask:
            allowed = row.nonzero().squeeze(1)
            options.append(space[int(allowed[int(torch.randint(len(allowed), (1,), generator=generator))])])
        return self.make(options)

    def random_near(self, bits: float, generator: torch.Generator | None = None) -> QConfig:
        """A random configuration whose avg_bits is close to ``bits``.

        Each matrix takes one of the two code widths around ``bits`` (e.g. 4 or 8 for 6.0) with the
        probability that makes the expected width ``bits``; its other four fields are uniform.
        """
        family = self.family
        if "bits" not in family.field_choices:
            return self.random_near_cost(bits, generator)
        widths = sorted(family.field_choices["bits"])
        lower = max([w for w in widths if w <= bits], default=widths[0])
        upper = min([w for w in widths if w >= bits], default=widths[-1])
        p_upper = 0.0 if upper == lower else (bits - lower) / (upper - lower)
        pick_upper = torch.rand(len(self), generator=generator) < p_upper
        options = []
        for use_upper in pick_upper.tolist():
            rest = [int(torch.randint(size, (1,), generator=generator)) for size in family.field_sizes[1:]]
            width_index = family.field_choices["bits"].index(upper if use_upper else lower)
            options.append(family.decode([width_index, *rest]))
        return self.make(options)

    def random_near_cost(self, bits: float, generator: torch.Generator | None = None) -> QConfig:
        """:meth:`random_near` of a family without a ``bits`` field: each target takes an allowed option of
        the two costs around ``bits`` (as close as its rows allow), the dearer with the probability that
        makes the expected cost ``bits``, and among options of that cost one uniformly."""
        space = self.family.option_space
        costs = self.option_bits.tolist()
        options = []
        for row in self.option_mask.tolist():
            allowed = sorted({costs[k] for k, ok in enumerate(row) if ok})
            lower = max([c for c in allowed if c <= bits], default=allowed[0])
            upper = min([c for c in allowed if c >= bits], default=allowed[-1])
            p_upper = 0.0 if upper == lower else (bits - lower) / (upper - lower)
            cost = upper if float(torch.rand(1, generator=generator)) < p_upper else lower
            same = [k for k, ok in enumerate(row) if ok and costs[k] == cost]
            options.append(space[same[int(torch.randint(len(same), (1,), generator=generator))]])
        return self.make(options)

    # -- cost -----------------------------------------------------------------------------------------
    def avg_bits(self, config: QConfig) -> float:
        """Parameter-weighted mean storage bits over the target matrices (SPEC §2.2)."""
        bits_of = self.family.bits_per_weight
        bits = torch.tensor([bits_of(config.matrices[n]) for n in self.names], dtype=torch.float64)
        return float((bits * self.numel).sum() / self.numel.sum())

    def avg_bits_encoded(self, encoded: torch.Tensor) -> torch.Tensor:
        """avg_bits of a batch of encodings (..., N, 5) of integer option indices."""
        bits = self.family.bits_from_indices(encoded.long())
        return (bits * self.numel.to(bits)).sum(-1) / self.total_numel

    # -- validation ------------------------------------------------------------------------------------
    def validate(self, config: QConfig, where: str = "qconfig") -> QConfig:
        """Check that ``config`` covers exactly this backbone's targets; return it in target order."""
        if not _same_model(config.model, self.model):
            raise CoaloraError(
                f"{where} was written for backbone '{config.model}', not '{self.model}'; "
                f"allocate one for this model with `coalora allocate --model {self.model}`"
            )
        extra = [n for n in config.matrices if n not in self._index]
        if extra:
            raise CoaloraError(
                f"{where} names module '{extra[0]}' that backbone '{self.model}' does not have "
                f"({len(extra)} unknown); is it for another backbone?"
            )
        missing = [n for n in self.names if n not in config.matrices]
        if missing:
            raise CoaloraError(
                f"{where} is missing target module '{missing[0]}' ({len(missing)} of {len(self)} missing); "
                "every target matrix needs an option"
            )
        ordered = self.make(config.matrices[n] for n in self.names)
        self.check_options(ordered, where)
        if config.declared_bits is not None:
            actual = self.avg_bits(ordered)
            if abs(actual - float(config.declared_bits)) > 1e-4 * max(1.0, actual):
                raise CoaloraError(
                    f"{where} states avg_bits {config.declared_bits:g} but its matrices average {actual:.4f} "
                    "bits (edited by hand?); fix or remove avg_bits, or write the file with coalora allocate"
                )
        return ordered

    def check_options(self, config: QConfig, where: str = "qconfig") -> None:
        """Every option is one of the family's and allowed on its target's rows; else one line."""
        position, mask = self.option_position, self.option_mask
        for i, (target, option) in enumerate(zip(self.targets, config.matrices.values(), strict=True)):
            k = position.get(option)
            if k is None:
                raise CoaloraError(
                    f"{where}: matrix '{target.name}' has {option!r}, not a '{self.family_name}' option; "
                    f"this run codes with {self.family_name} (write the qconfig for it)"
                )
            if not mask[i, k]:
                fits = [
                    o.short() for o, ok in zip(self.family.option_space, mask[i].tolist(), strict=True) if ok
                ]
                raise CoaloraError(
                    f"{where}: matrix '{target.name}' (rows of {target.in_features} weights) cannot take "
                    f"{self.family_name} {option.short()}; its rows allow {', '.join(fits)}"
                )

    @cached_property
    def option_position(self) -> dict:
        """Option -> its index in the family's option space."""
        return {o: k for k, o in enumerate(self.family.option_space)}

    def load(self, path: str | os.PathLike) -> QConfig:
        return self.validate(QConfig.load(path, self.family_name), where=f"qconfig '{path}'")

    def save(self, config: QConfig, path: str | os.PathLike) -> None:
        config.save(path, avg_bits=self.avg_bits(config))

    # -- encoding for the search -------------------------------------------------------------------------
    def encode(self, config: QConfig) -> torch.Tensor:
        """(N, 5) long tensor of option-field indices."""
        encode = self.family.encode
        return torch.tensor([encode(config.matrices[n]) for n in self.names], dtype=torch.long)

    def decode(self, encoded: torch.Tensor) -> QConfig:
        rows = encoded.reshape(len(self), len(self.family.field_names)).tolist()
        return self.make(self.family.decode(row) for row in rows)

    def normalise(self, encoded: torch.Tensor) -> torch.Tensor:
        """Map indices to [0, 1] by the known field sizes (never by data min/max: no zero division)."""
        sizes = torch.tensor(self.family.field_sizes, dtype=torch.float64)
        flat = encoded.to(torch.float64).reshape(*encoded.shape[:-2], len(self), len(sizes))
        return (flat / (sizes - 1)).reshape(*encoded.shape[:-2], self.dim)


def _storage_bits_from_indices(indices: torch.Tensor) -> torch.Tensor:
    """Vectorised QuantOption.storage_bits for (..., 5) field indices (the ``nf``/``int`` schema's)."""
    return get_family("nf").bits_from_indices(indices)


def option_index(option: QuantOption) -> int:
    """Position of ``option`` in OPTION_SPACE."""
    return _OPTION_POSITION[option]


_OPTION_POSITION = {o: i for i, o in enumerate(OPTION_SPACE)}
