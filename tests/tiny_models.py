"""Tiny random backbones (2 layers, hidden 64) built from configs in code, with working tokenizers.

BERT reuses the packaged MiniLM WordPiece vocabulary; RoBERTa and LLaMA get a small byte-level BPE
trained in code on a few sentences, so every family runs end to end offline.
"""

from __future__ import annotations

from pathlib import Path

import torch

SENTENCES = [
    "a gripping , funny and moving film",
    "the plot is thin and the acting is wooden",
    "it is neither good nor bad , just dull",
    "one of the best movies of the year",
]


def _bpe_tokenizer(kind: str):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    bpe.train_from_iterator(SENTENCES * 4, vocab_size=300, min_frequency=1, special_tokens=specials)
    if kind == "roberta":
        from tokenizers.processors import RobertaProcessing

        bpe.post_processor = RobertaProcessing(("</s>", 2), ("<s>", 0))
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        mask_token="<mask>",
    )


def tiny_config(kind: str):
    from transformers import BertConfig, LlamaConfig, Qwen2Config, RobertaConfig

    common = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
    if kind == "bert":
        return BertConfig(vocab_size=30522, max_position_embeddings=128, **common)
    if kind == "roberta":
        return RobertaConfig(vocab_size=300, max_position_embeddings=130, pad_token_id=1, **common)
    if kind == "llama":
        return LlamaConfig(
            vocab_size=300,
            max_position_embeddings=128,
            num_key_value_heads=2,
            pad_token_id=1,
            bos_token_id=0,
            eos_token_id=2,
            **common,
        )
    if kind == "qwen2":
        return Qwen2Config(
            vocab_size=300,
            max_position_embeddings=128,
            num_key_value_heads=2,
            pad_token_id=1,
            bos_token_id=0,
            eos_token_id=2,
            tie_word_embeddings=True,
            **common,
        )
    raise ValueError(kind)


#: tiny causal LMs: (folder name, config kind, tied input/output embeddings)
CAUSAL_LMS = (("tiny-llama-lm", "llama", False), ("tiny-qwen2-lm", "qwen2", True))


def save_tiny_models(root: Path) -> dict[str, Path]:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from coalora.pretrained import DEFAULT_MODEL, resolve_model_path

    paths = {}
    for kind in ("bert", "roberta", "llama"):
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_config(tiny_config(kind))
        folder = root / f"tiny-{kind}"
        model.save_pretrained(folder)
        tokenizer = (
            AutoTokenizer.from_pretrained(resolve_model_path(DEFAULT_MODEL))
            if kind == "bert"
            else _bpe_tokenizer(kind)
        )
        tokenizer.save_pretrained(folder)
        paths[kind] = folder
    from transformers import AutoModelForCausalLM

    for name, kind, tied in CAUSAL_LMS:
        torch.manual_seed(0)
        config = tiny_config(kind)
        config.tie_word_embeddings = tied
        model = AutoModelForCausalLM.from_config(config)
        folder = root / name
        model.save_pretrained(folder)
        _bpe_tokenizer(kind).save_pretrained(folder)
        paths[name] = folder
    return paths


def untrained_task(model_dir: Path, causal: bool, seed: int = 0, **task_args):
    """An untrained CoA-LoRA task whose adapter matters (B and the mapper's last layer moved off zero),
    and a random configuration of it (mixed bits, block sizes and scale dtypes; no allocator run)."""
    from coalora.tasks.causal_lm import CausalLMTask
    from coalora.tasks.classification import ClassificationTask

    torch.manual_seed(seed)
    task_class = CausalLMTask if causal else ClassificationTask
    task = task_class(model_name=str(model_dir), rank=4, train_budgets=[], eval_budgets=[], **task_args)
    task.eval()
    with torch.no_grad():
        torch.nn.init.normal_(task.model.mapper.net[-1].weight, std=0.05)
        for layer in task.model.layers:
            torch.nn.init.normal_(layer.lora_B, std=0.05)
    return task, task.model.space.random(torch.Generator().manual_seed(seed))


def tiny_glue_data(model_dir: Path, glue_dir: Path, **overrides):
    """A GLUE data module over the SST-2 fixture for a tiny backbone: small, no search split."""
    from coalora.data.glue_datamodule import GLUEDataModule

    args = dict(
        model_name=str(model_dir),
        glue_dir=str(glue_dir),
        train_file="sst2/sentence/stsa.binary.train",
        train_limit=32,
        eval_limit=16,
        batch_size=8,
        search_size=0,
    )
    return GLUEDataModule(**{**args, **overrides})


def save_wordpiece_llama(folder: Path, causal: bool = True) -> Path:
    """A tiny random LLaMA saved with MiniLM's WordPiece tokenizer, its ``[SEP]`` set as EOS: a decoder
    whose tokenizer returns ``token_type_ids``, which LLaMA's forward does not name (issue 23, item 6)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from coalora.pretrained import DEFAULT_MODEL, resolve_model_path

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(DEFAULT_MODEL))
    tokenizer.eos_token = tokenizer.sep_token
    config = tiny_config("llama")
    config.vocab_size = len(tokenizer)
    config.pad_token_id = tokenizer.pad_token_id
    config.bos_token_id = tokenizer.cls_token_id
    config.eos_token_id = tokenizer.sep_token_id
    torch.manual_seed(0)
    auto = AutoModelForCausalLM if causal else AutoModelForSequenceClassification
    auto.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
