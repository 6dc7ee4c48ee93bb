"""GGUF export for llama.cpp (issue #26, items 3 and 4): the files read back right, and llama.cpp runs them.

The fast tests read ``model.gguf`` / ``adapter.gguf`` back with the ``gguf`` package's reader and decoders
(independent of coalora's): names, shapes, types, metadata, the q/k reordering, the tokenizer, and bytes
that add up to the configuration's bits per weight. The slow tests load them in llama.cpp
(llama-cpp-python; skipped when it is not installed) and hold its tokenizer, logits and greedy tokens to
the Hugging Face tokenizer and a float32 transformers forward of the network the files describe, on the
tiny model trained to recite its corpus (a random model's top two logits are often a rounding apart).
"""

from __future__ import annotations

import numpy
import pytest
import torch

from coalora.deploy.gguf_check import lora_deltas, read_field, read_tensors, reference_model
from coalora.deploy.gguf_export import target_types, write_llama_gguf, write_lora_gguf
from coalora.deploy.gguf_names import from_llamacpp_rows, gguf_name, qk_row_order, to_llamacpp_rows
from coalora.errors import CoaloraError
from coalora.quant import gguf_kernels
from coalora.quant.gguf_types import GGUF_TYPES
from tests.gguf_tiny import (
    MIXES,
    PROMPTS,
    TEXTS,
    memorize,
    mix_types,
    random_lora,
    tiny_llama,
    tiny_tokenizer,
)

gguf = pytest.importorskip("gguf")
ALPHA = 16.0
#: llama.cpp against float32 transformers: max |Δ logit| / max |logit| over every position of every prompt.
#: llama.cpp multiplies K-quant weights with Q8_K activations (Q8_0/Q8_1 for the 32-weight types) and F16
#: weights (token_embd, output) with F16 activations, and keeps K/V in F16. Measured on the memorized
#: model: 0.44 % (legacy types) to 0.83 % (all Q4_K), max |Δ| 0.07-0.14 at max |logit| ~16; the Q8
#: activations are most of it (random model, F32 weights, F16 KV cache: 0.06 %). Leaving the adapter
#: out, or a wrong q/k order, moves the logits by far more.
REL_TOL = 2e-2
#: the same with every tensor F32 and an F32 KV cache: float32 rounding only (measured 2.9e-7)
EXACT_REL_TOL = 1e-5


@pytest.fixture(scope="module")
def tiny():
    tokenizer = tiny_tokenizer()
    return tokenizer, tiny_llama(tokenizer)


@pytest.fixture(scope="module")
def packed(tiny):
    """(module, type) -> the weight's block bytes, quantized once for all the tests (the K-quant search is
    the slow part; test_packed_bytes_and_f32_dense holds the writer's own quantizing to the same bytes)."""
    model = tiny[1]
    cache: dict[tuple[str, str], torch.Tensor] = {}

    def get(module: str, kind: str) -> torch.Tensor:
        if (module, kind) not in cache:
            cache[module, kind] = gguf_kernels.quantize(model.get_submodule(module).weight, kind)
        return cache[module, kind]

    return get


@pytest.fixture(scope="module")
def written(tiny, packed, tmp_path_factory):
    """Per mix: (summary of model.gguf, summary of adapter.gguf, folder)."""
    tokenizer, model = tiny
    lora = random_lora(model)
    out = {}
    for mix in MIXES:
        folder = tmp_path_factory.mktemp(mix)
        types = mix_types(model, mix)
        given = {m: packed(m, k) for m, k in types.items()}
        base = write_llama_gguf(model, tokenizer, types, folder / "model.gguf", packed=given)
        adapter = write_lora_gguf(lora, ALPHA, folder / "adapter.gguf", config=model.config)
        out[mix] = (base, adapter, folder)
    return out


def _fields(path) -> dict:
    reader = gguf.GGUFReader(str(path))
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def test_qk_order_is_the_converters_permutation():
    w = torch.arange(2 * 8 * 3).reshape(16, 3)  # 2 heads of head_dim 8
    heads = 2
    converter = w.reshape(heads, 2, 16 // heads // 2, 3).swapaxes(1, 2).reshape(w.shape)
    assert torch.equal(w[qk_row_order(16, heads)], converter)
    name = "model.layers.0.self_attn.k_proj"
    assert torch.equal(from_llamacpp_rows(to_llamacpp_rows(w, name, 4, 2), name, 4, 2), w)
    assert torch.equal(to_llamacpp_rows(w, "model.layers.0.self_attn.v_proj", 4, 2), w)
    assert gguf_name("model.layers.1.mlp.down_proj.weight") == "blk.1.ffn_down.weight"
    assert gguf_name("lm_head") == "output.weight"
    with pytest.raises(CoaloraError, match="not a LLaMA weight"):
        gguf_name("model.layers.0.self_attn.rotary_emb")


def test_names_shapes_types_and_metadata(tiny, written):
    _, model = tiny
    base, _, folder = written["q2k_q3k_q6k"]
    reader = gguf.GGUFReader(str(folder / "model.gguf"))
    tensors = {t.name: t for t in reader.tensors}
    attn = ["attn_q", "attn_k", "attn_v", "attn_output", "attn_norm"]
    per_block = [*attn, "ffn_gate", "ffn_up", "ffn_down", "ffn_norm"]
    expected = {f"blk.{i}.{n}.weight" for i in range(2) for n in per_block}
    assert set(tensors) == expected | {"token_embd.weight", "output_norm.weight", "output.weight"}
    state = model.state_dict()
    types = mix_types(model, "q2k_q3k_q6k")
    for key, value in state.items():
        t = tensors[gguf_name(key)]
        assert [int(d) for d in t.shape] == list(reversed(value.shape)), key  # ne = torch shape reversed
        module = key.removesuffix(".weight")
        want = types.get(module, "F32" if value.dim() == 1 else "F16")
        assert t.tensor_type.name == want, key

    fields = _fields(folder / "model.gguf")
    c = model.config
    assert fields["general.architecture"] == "llama" and fields["general.type"] == "model"
    assert fields["llama.context_length"] == c.max_position_embeddings
    assert fields["llama.embedding_length"] == 256 and fields["llama.feed_forward_length"] == 768
    assert fields["llama.block_count"] == 2 and fields["llama.vocab_size"] == c.vocab_size
    assert fields["llama.attention.head_count"] == 4 and fields["llama.attention.head_count_kv"] == 2
    assert fields["llama.rope.dimension_count"] == 64
    assert fields["llama.rope.freq_base"] == pytest.approx(10000.0)
    assert fields["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(c.rms_norm_eps)
    assert fields["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q2_K  # Q2_K holds the most weights
    assert base["tokenizer_notes"] and "Lowercase" in base["tokenizer_notes"][0]


def test_tokenizer_metadata(tiny, written):
    tokenizer, model = tiny
    fields = _fields(written["all_q4_k"][2] / "model.gguf")
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    tokens, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    assert len(tokens) == len(types) == model.config.vocab_size > len(tokenizer)
    vocab = tokenizer.get_vocab()
    assert all(tokens[i] == t for t, i in vocab.items())
    assert tokens[-1] == f"[PAD{len(tokens) - 1}]" and types[-1] == gguf.TokenType.UNUSED
    for special in ("<s>", "</s>", "<unk>", "<pad>"):
        assert types[vocab[special]] == gguf.TokenType.CONTROL
    assert types[vocab["Ġthe"]] == gguf.TokenType.NORMAL
    assert fields["tokenizer.ggml.bos_token_id"] == tokenizer.bos_token_id
    assert fields["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id
    assert fields["tokenizer.ggml.add_bos_token"] is True and fields["tokenizer.ggml.add_eos_token"] is False
    merges = fields["tokenizer.ggml.merges"]
    assert len(merges) > 100 and all(len(m.split(" ")) == 2 for m in merges)


@pytest.mark.parametrize("mix", list(MIXES))
def test_target_bytes_decode_to_the_quantized_weight(tiny, written, packed, mix):
    """gguf's own numpy decoder on the stored bytes, rows put back, equals quantize -> dequantize of W."""
    _, model = tiny
    reader = gguf.GGUFReader(str(written[mix][2] / "model.gguf"))
    tensors = {t.name: t for t in reader.tensors}
    for module, kind in mix_types(model, mix).items():
        weight = model.get_submodule(module).weight.detach()
        t = tensors[gguf_name(module)]
        decoded = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()).float()
        decoded = from_llamacpp_rows(decoded.reshape(weight.shape), module, 4, 2)
        want = gguf_kernels.dequantize(packed(module, kind), kind, weight.shape)
        assert torch.equal(decoded, want), module


def test_bytes_add_up_to_the_average_bits(tiny, written):
    _, model = tiny
    for mix, (base, _, folder) in written.items():
        types = mix_types(model, mix)
        numel = {m: model.get_submodule(m).weight.numel() for m in types}
        bits = sum(GGUF_TYPES[types[m]].bits_per_weight * numel[m] for m in types) / sum(numel.values())
        assert base["target_bits_per_weight"] == pytest.approx(bits, rel=1e-12)
        assert base["target_bytes"] == sum(GGUF_TYPES[types[m]].bits_per_weight * numel[m] / 8 for m in types)
        reader = gguf.GGUFReader(str(folder / "model.gguf"))
        stored = {t.name: int(t.n_bytes) for t in reader.tensors}
        targets = {gguf_name(m) for m in types}
        assert sum(v for k, v in stored.items() if k in targets) == base["target_bytes"]
        assert sum(v for k, v in stored.items() if k not in targets) == base["other_bytes"]
        size = (folder / "model.gguf").stat().st_size
        assert size == base["file_bytes"]
        # the rest is the header, metadata (the tokenizer is most of it) and 32-byte alignment padding
        last = max(reader.tensors, key=lambda t: t.data_offset)
        assert size == last.data_offset + last.n_bytes
        assert 0 < base["overhead_bytes"] < 16_000


def test_lora_file(tiny, written):
    _, model = tiny
    folder = written["all_q4_k"][2]
    fields = _fields(folder / "adapter.gguf")
    assert fields["general.architecture"] == "llama" and fields["general.type"] == "adapter"
    assert fields["adapter.type"] == "lora" and fields["adapter.lora.alpha"] == pytest.approx(ALPHA)
    reader = gguf.GGUFReader(str(folder / "adapter.gguf"))
    tensors = {t.name: t for t in reader.tensors}
    lora = random_lora(model)
    assert len(tensors) == 2 * len(lora)
    deltas = lora_deltas(folder / "adapter.gguf")
    for module, (a, b) in lora.items():
        name = gguf_name(module)
        ta, tb = tensors[name + ".lora_a"], tensors[name + ".lora_b"]
        out, rank, inp = b.shape[0], a.shape[0], a.shape[1]
        assert [int(d) for d in ta.shape] == [inp, rank] and [int(d) for d in tb.shape] == [rank, out]
        assert ta.tensor_type.name == tb.tensor_type.name == "F32"
        want = (ALPHA / rank) * (b.double() @ a.double()).float()
        got = from_llamacpp_rows(deltas[name], module, 4, 2)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_reference_model_holds_the_files_weights(tiny, written, packed):
    _, model = tiny
    folder = written["q8_0_q5_k"][2]
    ref = reference_model(model, folder / "model.gguf", folder / "adapter.gguf")
    lora = random_lora(model)
    for module, kind in mix_types(model, "q8_0_q5_k").items():
        w = model.get_submodule(module).weight.detach()
        a, b = lora[module]
        want = gguf_kernels.dequantize(packed(module, kind), kind, w.shape)
        want = want + (ALPHA / a.shape[0]) * (b.double() @ a.double()).float()
        torch.testing.assert_close(ref.get_submodule(module).weight, want, rtol=0, atol=1e-6)
    emb = model.model.embed_tokens.weight.detach()
    assert torch.equal(ref.model.embed_tokens.weight, emb.half().float())
    assert torch.equal(ref.model.norm.weight, model.model.norm.weight)


def test_packed_bytes_and_f32_dense(tiny, packed, tmp_path):
    tokenizer, model = tiny
    types = target_types(model, "Q6_K")
    a = write_llama_gguf(model, tokenizer, types, tmp_path / "a.gguf")  # quantizes here
    given = {m: packed(m, "Q6_K") for m in types}
    write_llama_gguf(model, tokenizer, types, tmp_path / "b.gguf", packed=given)
    assert (tmp_path / "a.gguf").read_bytes() == (tmp_path / "b.gguf").read_bytes()
    assert a["target_bits_per_weight"] == 6.5625
    f32 = write_llama_gguf(model, tokenizer, {}, tmp_path / "f32.gguf", dense_type="F32")
    stored = read_tensors(tmp_path / "f32.gguf")
    q = model.model.layers[1].self_attn.q_proj.weight.detach()
    assert stored["blk.1.attn_q.weight"][0] == "F32"
    assert torch.equal(from_llamacpp_rows(stored["blk.1.attn_q.weight"][1], "x.self_attn.q_proj", 4, 2), q)
    assert f32["target_bytes"] == 0 and read_field(tmp_path / "f32.gguf", "general.file_type") == 0
    assert not list(tmp_path.glob("*.partial"))


def test_refusals(tiny, tmp_path):
    tokenizer, model = tiny
    with pytest.raises(CoaloraError, match="linear kinds"):
        write_llama_gguf(model, tokenizer, {"model.layers.0.input_layernorm": "Q8_0"}, tmp_path / "m.gguf")
    with pytest.raises(CoaloraError, match="unknown GGUF type"):
        write_llama_gguf(model, tokenizer, {"model.layers.0.mlp.up_proj": "Q7_K"}, tmp_path / "m.gguf")
    with pytest.raises(CoaloraError, match="dense_type"):
        write_llama_gguf(model, tokenizer, {}, tmp_path / "m.gguf", dense_type="BF16")
    up = "model.layers.0.mlp.up_proj"
    bad = {up: torch.zeros(10, 10, dtype=torch.uint8)}
    with pytest.raises(CoaloraError, match="packed bytes"):
        write_llama_gguf(model, tokenizer, {up: "Q4_K"}, tmp_path / "m.gguf", packed=bad)
    factors = {"model.layers.0.self_attn.o_proj": (torch.zeros(4, 256), torch.zeros(256, 8))}
    with pytest.raises(CoaloraError, match="A \\[r, in\\]"):
        write_lora_gguf(factors, 8.0, tmp_path / "l.gguf", config=model.config)
    assert not list(tmp_path.iterdir())


def test_tied_embeddings_write_no_output_tensor(tmp_path):
    """A tied LLaMA has no ``output`` tensor (llama.cpp then reuses ``token_embd``), as the converter does."""
    tokenizer = tiny_tokenizer()
    model = tiny_llama(tokenizer, layers=1)
    model.config.tie_word_embeddings = True
    model.tie_weights()
    write_llama_gguf(model, tokenizer, target_types(model, "Q8_0"), tmp_path / "m.gguf")
    names = set(read_tensors(tmp_path / "m.gguf"))
    assert "output.weight" not in names and "token_embd.weight" in names
    ref = reference_model(model, tmp_path / "m.gguf")
    assert ref.lm_head.weight.data_ptr() == ref.model.embed_tokens.weight.data_ptr()


def test_tokenizers_llamacpp_cannot_load_are_refused(tiny, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    _, model = tiny
    wordpiece = Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    wordpiece.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=wordpiece, unk_token="[UNK]")
    with pytest.raises(CoaloraError, match="byte-level BPE tokenizers only"):
        write_llama_gguf(model, tok, {}, tmp_path / "m.gguf")
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------------------------------ llama.cpp
@pytest.fixture(scope="module")
def memorized():
    """The tiny LLaMA trained to recite its corpus (~60 steps), so greedy next tokens are decided by
    margins of ~10 logits, far above llama.cpp's rounding; with random LoRA factors."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (coalora[gguf-check])")
    tokenizer = tiny_tokenizer()
    model = tiny_llama(tokenizer)
    memorize(model, tokenizer, steps=60, lr=5e-3)
    return tokenizer, model, random_lora(model)


@pytest.mark.slow
def test_llamacpp_tokenizes_like_transformers(memorized, tmp_path):
    from coalora.deploy.gguf_check import load_llamacpp

    tokenizer, model, _ = memorized
    write_llama_gguf(model, tokenizer, {}, tmp_path / "model.gguf")
    llm = load_llamacpp(tmp_path / "model.gguf", n_ctx=64, logits_all=False)
    for text in TEXTS:
        assert llm.tokenize(text.encode(), add_bos=True, special=False) == tokenizer(text)["input_ids"], text
    assert llm.token_bos() == tokenizer.bos_token_id and llm.token_eos() == tokenizer.eos_token_id


@pytest.mark.slow
@pytest.mark.parametrize("mix", list(MIXES))
def test_llamacpp_matches_transformers(memorized, tmp_path, mix):
    from coalora.deploy.gguf_check import compare, hf_logits, load_llamacpp

    tokenizer, model, lora = memorized
    base, adapter = tmp_path / "model.gguf", tmp_path / "adapter.gguf"
    write_llama_gguf(model, tokenizer, mix_types(model, mix), base)
    write_lora_gguf(lora, ALPHA, adapter, config=model.config)
    llm = load_llamacpp(base, adapter, n_ctx=128, threads=2)
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS]
    ref = reference_model(model, base, adapter)
    result = compare(ref, llm, prompts, n_greedy=6)
    print(mix, {k: v for k, v in result.items() if k != "greedy"})
    assert result["max_rel_logit_diff"] < REL_TOL, result
    assert all(g["agree_prefix"] == 6 for g in result["greedy"]), result["greedy"]
    # the adapter is really applied: without it the logits move by several times the difference (over all
    # prompts; at one prompt the margin was 4.4x for all Q4_K on a model memorized on one thread)
    plain = reference_model(model, base)
    moved = max(float(numpy.abs(hf_logits(plain, p) - hf_logits(ref, p)).max()) for p in prompts)
    assert moved > 3 * result["max_abs_logit_diff"]


@pytest.mark.slow
def test_llamacpp_matches_transformers_exactly_in_f32(memorized, tmp_path):
    """All-F32 files and an F32 KV cache: llama.cpp and transformers agree to float32 rounding, which pins
    the tensor names, the q/k reordering, rotary embedding, norms and the LoRA scale alpha / r."""
    from coalora.deploy.gguf_check import compare, load_llamacpp

    tokenizer, model, lora = memorized
    write_llama_gguf(model, tokenizer, {}, tmp_path / "model.gguf", dense_type="F32")
    write_lora_gguf(lora, ALPHA, tmp_path / "adapter.gguf", config=model.config)
    llm = load_llamacpp(tmp_path / "model.gguf", tmp_path / "adapter.gguf", n_ctx=128, kv_f32=True)
    ref = reference_model(model, tmp_path / "model.gguf", tmp_path / "adapter.gguf")
    result = compare(ref, llm, [tokenizer(p)["input_ids"] for p in PROMPTS], n_greedy=6)
    print({k: v for k, v in result.items() if k != "greedy"})
    assert result["max_rel_logit_diff"] < EXACT_REL_TOL, result
    assert all(g["agree_prefix"] == 6 for g in result["greedy"]), result["greedy"]
