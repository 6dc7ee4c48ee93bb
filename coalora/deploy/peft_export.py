"""Interop: one configuration as a standard PEFT LoRA adapter on top of a dequantized base model.

The export folder holds ``base/`` (a normal Hugging Face model folder: the dequantized target weights, the
full-precision rest, the tokenizer) and ``adapter/`` (``adapter_config.json``, ``adapter_model.safetensors``:
A and the folded B·M per target, the task head via ``modules_to_save``), so plain transformers + peft run it:

    base = AutoModelForSequenceClassification.from_pretrained("out/base")  # AutoModelForCausalLM for LMs
    model = PeftModel.from_pretrained(base, "out/adapter")

The base is stored in full precision (peft has no packed low-bit format), so it is for compatibility, not
for size; the coalora artifact is the compact form.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from torch import nn

from coalora.deploy.files import file_inventory, staged_dir
from coalora.deploy.layout import METADATA_FILE, Artifact
from coalora.deploy.loaded import is_causal, plain_model
from coalora.errors import CoaloraError
from coalora.nn.model import head_parameter_names

PEFT_FORMAT = "coalora.peft/1"
BASE_DIR = "base"
ADAPTER_DIR = "adapter"


def head_modules(model: nn.Module) -> list[str]:
    """Modules holding the task head, for ``modules_to_save``: top-level heads and the pooler, if any."""
    prefix = getattr(model, "base_model_prefix", "")
    modules = []
    for name in head_parameter_names(model):
        if name.startswith(prefix + ".") and ".pooler." in name:
            module = name[: name.index(".pooler.") + len(".pooler")]
        else:
            module = name.split(".")[0]
        if module not in modules:
            modules.append(module)
    return modules


def write_peft(artifact: Artifact, out: str | os.PathLike, tokenizer: Any) -> dict:
    """Write ``base/`` and ``adapter/`` for ``artifact``'s configuration, atomically; return the metadata."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise CoaloraError("the peft format needs the peft package; pip install 'coalora[peft]'") from None

    base = plain_model(artifact)
    names = list(artifact.adapter)
    rank = next(iter(artifact.adapter.values()))[0].shape[0]
    scaling = float(artifact.metadata["lora_scaling"])
    with staged_dir(out) as tmp:
        base.save_pretrained(tmp / BASE_DIR)
        tokenizer.save_pretrained(tmp / BASE_DIR)
        causal = is_causal(artifact.metadata)
        config = LoraConfig(
            task_type="CAUSAL_LM" if causal else "SEQ_CLS",
            r=rank,
            # peft scales by lora_alpha / r; a float alpha keeps the exact scaling (peft stores it as given)
            lora_alpha=scaling * rank,  # type: ignore[arg-type]
            lora_dropout=0.0,
            bias="none",
            target_modules=names,
            # a causal LM's head stays frozen (and is not saved); peft adds "classifier"/"score" for SEQ_CLS
            modules_to_save=None
            if causal
            else [m for m in head_modules(base) if m not in ("classifier", "score")] or None,
        )
        model = get_peft_model(base, config)  # wraps in place; the base was saved before
        model.peft_config["default"].base_model_name_or_path = str(tmp / BASE_DIR)  # peft reads it on save
        wrapped: Any = model.base_model.model  # the base with peft's LoRA layers in place
        for name in names:
            layer = wrapped.get_submodule(name)
            lora_a, lora_b = artifact.adapter[name]
            layer.lora_A["default"].weight.data.copy_(lora_a)
            layer.lora_B["default"].weight.data.copy_(lora_b)
        model.save_pretrained(str(tmp / ADAPTER_DIR))
        # where the base will be once the folder is in place (AutoPeftModel* loads it from there)
        adapter_config = tmp / ADAPTER_DIR / "adapter_config.json"
        data = json.loads(adapter_config.read_text())
        data["base_model_name_or_path"] = str(Path(out).resolve() / BASE_DIR)
        adapter_config.write_text(json.dumps(data, indent=2) + "\n")
        metadata = dict(artifact.metadata, format=PEFT_FORMAT, base=BASE_DIR, adapter=ADAPTER_DIR)
        metadata["files"] = file_inventory(tmp)
        (tmp / METADATA_FILE).write_text(json.dumps(metadata, indent=1) + "\n")
    return metadata
