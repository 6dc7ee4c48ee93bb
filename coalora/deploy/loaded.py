"""A loaded artifact as a ready model: the Hugging Face classifier or causal LM rebuilt from ``config.json``
with the adapter as a separate LoRA (or merged); ``predict`` (classes) or ``generate`` (text) on raw text.

By default the target matrices stay packed (:class:`~coalora.nn.packed_lora.PackedLoRALinear`, which
dequantizes one layer at a time inside ``forward``), so a 3-bit model holds about its artifact's bytes:
the model is built with its parameters on the meta device, the artifact's full-precision tensors are
assigned in place (not copied) and no dequantized target ever exists at rest. ``dequantize=True`` (and
``merge=True``, which needs dense weights) gives the dense model: more memory, a faster forward.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from coalora.deploy.layout import REEXPORT, Artifact
from coalora.deploy.reader import read_artifact
from coalora.deploy.texts import check_texts
from coalora.errors import CoaloraError
from coalora.nn.lora import LoRALinear
from coalora.nn.packed_lora import PackedLoRALinear
from coalora.quant.qconfig import QConfig
from coalora.quant.targets import discover_targets
from coalora.utils import first_line, intra_op_threads, model_inputs, quiet_transformers

if TYPE_CHECKING:
    from transformers import PreTrainedModel


def is_causal(metadata: dict) -> bool:
    """Whether an artifact holds a causal LM (artifacts from before task types were recorded: classifiers)."""
    return metadata.get("task_type", "classification") == "causal_lm"


def _tied_keys(model: nn.Module) -> set[str]:
    """State-dict keys that share their tensor with an earlier key (a tied LM head)."""
    seen: set[int] = set()
    tied = set()
    for key, value in model.state_dict().items():
        if value.data_ptr() in seen:
            tied.add(key)
        seen.add(value.data_ptr())
    return tied


def _auto_class(artifact: Artifact) -> Any:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    return AutoModelForCausalLM if is_causal(artifact.metadata) else AutoModelForSequenceClassification


def plain_model(artifact: Artifact) -> PreTrainedModel:
    """The HF model (classifier or causal LM) from the artifact's config with dequantized targets and no
    adapter, in eval mode."""
    with quiet_transformers():
        model = _auto_class(artifact).from_config(artifact.hf_config)
    state = dict(artifact.full_precision)
    with intra_op_threads(1):
        for name, packed in artifact.packed.items():
            state[f"{name}.weight"] = packed.dequantize()
    result = model.load_state_dict(state, strict=False)
    tied = _tied_keys(model)
    if [k for k in result.missing_keys if k not in tied]:
        missing = [k for k in result.missing_keys if k not in tied]
        raise CoaloraError(f"artifact misses tensor '{missing[0]}' ({len(missing)} missing); {REEXPORT}")
    if result.unexpected_keys:
        raise CoaloraError(f"artifact holds unknown tensor '{result.unexpected_keys[0]}'; {REEXPORT}")
    return model.eval()


@contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """While a model is built, create every parameter on the meta device (no memory, no initialisation
    cost); buffers stay real, since position ids and rotary frequencies are computed in ``__init__`` and
    no artifact stores them. (The approach of accelerate's ``init_empty_weights``; not thread-safe.)"""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and not param.is_meta:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = on_meta  # type: ignore[method-assign, assignment]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


@contextmanager
def _no_initialisation() -> Iterator[None]:
    """Skip the model's weight initialisation while it is built: every parameter is about to be replaced
    by the artifact's, and initialising meta tensors runs torch's Python reference ops (~28 ms for
    MiniLM). transformers' own ``no_init_weights`` (``transformers.initialization`` in 5.x, ``modeling_utils``
    before); where neither exists the model is initialised as before."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:
        try:
            from transformers.modeling_utils import no_init_weights  # type: ignore[attr-defined,no-redef]
        except ImportError:
            yield
            return
    with no_init_weights():
        yield


def _shared_parameters(model: nn.Module) -> dict[str, str]:
    """Key -> the earlier key whose parameter it is (a tied LM head); by identity, which works on meta."""
    first: dict[int, str] = {}
    shared = {}
    for key, value in model.state_dict(keep_vars=True).items():
        if id(value) in first:
            shared[key] = first[id(value)]
        first.setdefault(id(value), key)
    return shared


def _check_targets(model: nn.Module, artifact: Artifact) -> list[str]:
    names = [t.name for t in discover_targets(model)]
    if names != list(artifact.adapter):
        raise CoaloraError(
            f"the backbone in config.json does not have the artifact's target matrices; {REEXPORT}"
        )
    return names


def packed_model(artifact: Artifact) -> nn.Module:
    """The HF model with every target a :class:`PackedLoRALinear` over the artifact's packed tensors and
    adapter, in eval mode; the artifact's tensors are used in place, so nothing full-size is allocated
    for a target (its ``nn.Linear`` weight only ever exists on the meta device)."""
    with quiet_transformers(), _parameters_on_meta(), _no_initialisation():
        model = _auto_class(artifact).from_config(artifact.hf_config)
    model.tie_weights()  # skipping the initialisation skips the tying too (tied LM heads)
    names = _check_targets(model, artifact)
    shared = _shared_parameters(model)
    built = model.state_dict(keep_vars=True)
    narrowed = set(artifact.metadata.get("narrowed_embeddings", []))
    state = {  # in the model's dtypes, as copying into it would give (a no-op, no copy, where they agree)
        key: value.to(built[key].dtype)
        if key in built and value.is_floating_point() and key not in narrowed
        else value
        for key, value in artifact.full_precision.items()
    }
    try:
        result = model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as err:  # a shape that config.json does not give
        raise CoaloraError(
            f"artifact tensors do not fit config.json ({first_line(err)}); {REEXPORT}"
        ) from None
    if result.unexpected_keys:
        raise CoaloraError(f"artifact holds unknown tensor '{result.unexpected_keys[0]}'; {REEXPORT}")
    for key, source in shared.items():  # assigning replaced the source parameter: tie it again
        owner, _, leaf = key.rpartition(".")
        setattr(model.get_submodule(owner), leaf, model.get_parameter(source))
    scaling = float(artifact.metadata["lora_scaling"])
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        linear, packed = getattr(parent, child), artifact.packed[name]
        if (linear.out_features, linear.in_features) != tuple(packed.shape):
            raise CoaloraError(
                f"'{name}' is {packed.shape[0]}x{packed.shape[1]} in the artifact but "
                f"{linear.out_features}x{linear.in_features} in config.json; {REEXPORT}"
            )
        dtype = linear.weight.dtype
        layer = PackedLoRALinear.from_packed(packed, linear.bias, *artifact.adapter[name], scaling, dtype)
        setattr(parent, child, layer)
    for key in narrowed:  # fp16 tables stay fp16; the rows they look up are widened to the model's dtype
        widen_lookups(model.get_submodule(key.rpartition(".")[0]), built[key].dtype)
    missing = [k for k, v in model.state_dict(keep_vars=True).items() if v.is_meta]
    if missing:
        raise CoaloraError(f"artifact misses tensor '{missing[0]}' ({len(missing)} missing); {REEXPORT}")
    return model.requires_grad_(False).eval()


def widen_lookups(embedding: nn.Module, dtype: torch.dtype) -> None:
    """Make an embedding stored narrower than the model return ``dtype`` rows (a forward hook, so the
    module stays the ``nn.Embedding`` Hugging Face code expects): only the looked-up rows are widened."""
    if not isinstance(embedding, nn.Embedding):
        raise CoaloraError(f"narrowed tensor of '{type(embedding).__name__}' is not an embedding; {REEXPORT}")
    embedding.register_forward_hook(lambda module, inputs, output: output.to(dtype))


def assemble(artifact: Artifact, merge: bool = False, dequantize: bool = False) -> nn.Module:
    """The HF model with the adapter as a separate LoRA: over packed targets (the default), or over
    dequantized dense targets with ``dequantize`` or ``merge`` (which folds the adapter into them).

    A full-precision (fp) artifact has no packed targets and always gives the dense model.
    """
    if artifact.packed and not (merge or dequantize):
        return packed_model(artifact)
    model = plain_model(artifact)
    names = _check_targets(model, artifact)
    scaling = float(artifact.metadata["lora_scaling"])
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        layer = LoRALinear.frozen(getattr(parent, child), *artifact.adapter[name], scaling)
        setattr(parent, child, layer.merged() if merge else layer)
    return model.requires_grad_(False).eval()


def predict_texts(
    logits_fn: Callable[[dict], torch.Tensor],
    tokenizer: Any,
    texts: Sequence[str | tuple[str, str]],
    label_names: Sequence[str],
    device: torch.device,
    batch_size: int = 32,
    max_length: int = 128,
) -> list[dict]:
    """Labels and probabilities (classification) or scores (regression) for raw texts or text pairs."""
    texts = check_texts(texts)  # None, ints, bytes: one line saying what to pass, not a tokenizer error
    results: list[dict] = []
    for start in range(0, len(texts), batch_size):
        chunk = list(texts[start : start + batch_size])
        pairs = [t if isinstance(t, (tuple, list)) else (t,) for t in chunk]
        if len({len(p) for p in pairs}) != 1:
            raise CoaloraError("mix of single texts and text pairs in one call; pass one kind")
        columns = [list(col) for col in zip(*pairs)]
        batch = tokenizer(*columns, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
        logits = logits_fn({k: v.to(device) for k, v in batch.items()}).float().cpu()
        if not label_names:
            results += [{"score": float(v)} for v in logits.reshape(len(chunk), -1)[:, 0]]
            continue
        probabilities = logits.softmax(dim=-1)
        for row in probabilities:
            best = int(row.argmax())
            results.append(
                {
                    "label": label_names[best],
                    "probability": float(row[best]),
                    "probabilities": {n: float(p) for n, p in zip(label_names, row)},
                }
            )
    return results


@torch.no_grad()
def generate_texts(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    device: torch.device,
    max_new_tokens: int = 32,
    **generate_kwargs: Any,
) -> list[str]:
    """Continuations of raw prompts (greedy unless ``generate_kwargs`` say otherwise), without the prompt."""
    if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
        raise CoaloraError("generate takes a list of prompt strings, e.g. generate(['The film'])")
    if max_new_tokens < 1:
        raise CoaloraError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # batched generation continues every prompt from its last token
    try:
        batch = tokenizer(list(prompts), return_tensors="pt", padding=True).to(device)
    finally:
        tokenizer.padding_side = side
    settings = {"do_sample": False, "pad_token_id": tokenizer.pad_token_id, **generate_kwargs}
    output = model.generate(**model_inputs(model, batch), max_new_tokens=max_new_tokens, **settings)
    return tokenizer.batch_decode(output[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)


class DeployedModel(nn.Module):
    """A loaded artifact: the HF model, its tokenizer and metadata; ``predict`` (classifiers) or ``generate``
    (causal LMs) work on raw text."""

    def __init__(self, model: nn.Module, tokenizer: Any, metadata: dict, qconfig: QConfig | None) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.metadata = metadata
        self.qconfig = qconfig

    @property
    def label_names(self) -> list[str]:
        return list(self.metadata.get("label_names", []))

    @property
    def avg_bits(self) -> float:
        return float(self.metadata["avg_bits"])

    def forward(self, **batch: torch.Tensor) -> torch.Tensor:
        """Logits of a tokenized batch; only the inputs the model's forward names reach it."""
        return self.model(**model_inputs(self.model, batch)).logits

    @torch.no_grad()
    def logits(self, batch: dict) -> torch.Tensor:
        return self(**batch)

    @property
    def is_causal(self) -> bool:
        return is_causal(self.metadata)

    def generate(self, prompts: Sequence[str], max_new_tokens: int = 32, **generate_kwargs: Any) -> list[str]:
        """Continuations of ``prompts`` by a causal-LM artifact (greedy by default)."""
        if not self.is_causal:
            raise CoaloraError("this artifact is a classifier: use predict(texts), not generate")
        device = next(self.model.parameters()).device
        return generate_texts(self.model, self.tokenizer, prompts, device, max_new_tokens, **generate_kwargs)

    def predict(
        self, texts: Sequence[str | tuple[str, str]], batch_size: int = 32, max_length: int = 128
    ) -> list[dict]:
        if self.is_causal:
            raise CoaloraError("this artifact is a causal LM: use generate(prompts), not predict")
        device = next(self.model.parameters()).device
        return predict_texts(
            self.logits, self.tokenizer, texts, self.label_names, device, batch_size, max_length
        )


def load(
    folder: str | os.PathLike, merge: bool = False, verify: bool | str = True, dequantize: bool = False
) -> DeployedModel:
    """Load an artifact written by ``coalora adapt`` as a ready model (no network, no checkpoint).

    The target weights stay packed and are dequantized one layer at a time inside ``forward``, so the
    model holds about the artifact's bytes; ``dequantize`` keeps dense dequantized weights instead (more
    memory, a faster forward). The folded adapter stays a separate LoRA (exactly the training computation)
    unless ``merge`` folds it into dense weights, which leaves a plain Hugging Face model. ``verify``
    checks every file's SHA-256 as well as its size, once per file on this machine (``"always"``: on
    every load; ``False``: sizes only).
    """
    artifact = read_artifact(folder, verify)
    model = assemble(artifact, merge, dequantize)
    return DeployedModel(model, artifact.tokenizer, artifact.metadata, artifact.qconfig)
