"""A tiny random LLaMA whose every linear input is a multiple of 256, for the GGUF writer's tests.

Hidden 256, intermediate 768, 2 layers, 4 query heads over 2 KV heads (so the q and k reorderings differ),
untied output, RMS-norm weights away from 1 (so a swapped norm shows). The tokenizer is the recipe of
``benchmarks/pretrain_tiny_lm.py`` (byte-level BPE, ``Lowercase`` normalizer, ``<s>`` added first) trained
on a few sentences; its 400 tokens are padded to 448 embedding rows, as the pretraining script pads to a
multiple of 64. Also the type mixes the tests and ``benchmarks/gguf_llamacpp.py`` run, and random LoRA
factors for every target.
"""

from __future__ import annotations

import torch

SPECIALS = ["<s>", "</s>", "<unk>", "<pad>"]
CORPUS = [
    "a gripping , funny and moving film",
    "the plot is thin and the acting is wooden",
    "it is neither good nor bad , just dull",
    "one of the best movies of the year",
    "the director's vision is bold ; the script, sadly, isn't",
    "we laughed, we cried, and we'd watch it again in 2024!",
    "an utterly forgettable sequel with 3 good scenes",
]
#: prompts whose logits are compared: corpus prefixes (a memorized model continues them decisively)
PROMPTS = ["the plot is thin", "one of the best", "we laughed, we cried, and", "an utterly forgettable"]
#: texts whose tokenization is compared (digits, apostrophes, punctuation runs, a double space)
TEXTS = [
    *PROMPTS,
    "one of the best movies of the year, and",
    "it isn't bad - just dull; we'd skip it...",
    "a 2nd watch: gripping  and moving (10/10)",
]
#: module kind -> type, per named mix (kinds are the module names inside a LLaMA block)
MIXES: dict[str, dict[str, str]] = {
    "all_q4_k": dict.fromkeys(
        ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"), "Q4_K"
    ),
    "q2k_q3k_q6k": {
        "q_proj": "Q3_K", "k_proj": "Q3_K", "v_proj": "Q6_K", "o_proj": "Q6_K",
        "gate_proj": "Q2_K", "up_proj": "Q2_K", "down_proj": "Q3_K",
    },
    "q8_0_q5_k": {
        "q_proj": "Q8_0", "k_proj": "Q8_0", "v_proj": "Q8_0", "o_proj": "Q8_0",
        "gate_proj": "Q5_K", "up_proj": "Q5_K", "down_proj": "Q5_K",
    },
    "legacy_32": {
        "q_proj": "Q4_0", "k_proj": "Q4_1", "v_proj": "Q5_0", "o_proj": "Q5_1",
        "gate_proj": "Q8_0", "up_proj": "Q4_0", "down_proj": "Q5_1",
    },
}  # fmt: skip


def tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    names = ["bos_token", "eos_token", "unk_token", "pad_token"]
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=256, **dict(zip(names, SPECIALS)))


def tiny_llama(tokenizer, seed: int = 0, hidden: int = 256, inner: int = 768, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    vocab = 64 * -(-len(tokenizer) // 64)
    ids = {f"{k}_token_id": getattr(tokenizer, f"{k}_token_id") for k in ("bos", "eos", "pad")}
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=inner, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        tie_word_embeddings=False, initializer_range=0.05, attn_implementation="eager", **ids,
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1 + 0.2 * torch.randn_like(param))
    return model


def mix_types(model, mix: str) -> dict[str, str]:
    """Module name -> type for every LLaMA block linear, by the named mix."""
    kinds = MIXES[mix]
    return {
        name: kinds[name.rsplit(".", 1)[-1]]
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and name.startswith("model.layers.")
    }


def random_lora(model, rank: int = 8, seed: int = 1) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Module name -> (A [r, in], B [out, r]) for every block linear; B not zero, so the update shows."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.startswith("model.layers."):
            a = torch.randn(rank, module.in_features, generator=gen) / module.in_features**0.5
            b = 0.03 * torch.randn(module.out_features, rank, generator=gen)
            out[name] = (a, b)
    return out


def memorize(model, tokenizer, steps: int = 120, lr: float = 3e-3, seed: int = 0):
    """Train ``model`` on the corpus until it nearly recites it, so its next tokens are decided by clear
    margins (a random model's top two logits are often within llama.cpp's rounding of each other)."""
    torch.manual_seed(seed)
    rows = [[*tokenizer(t)["input_ids"], tokenizer.eos_token_id] for t in CORPUS]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    labels = torch.full((len(rows), width), -100)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = labels[i, : len(r)] = torch.tensor(r)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return float(loss.detach())
