"""Gemma 4 against Hugging Face transformers, driven with hand-built runner metadata.

Tolerance: fp32 logits within 1e-4 absolute of HF's. The tiny checkpoints' logits
are O(0.5) (tied std-0.02 embeddings); the same math in another summation order
differs by ~1e-5, while dropping the sliding window, `layer_scalar` or the router's
`per_expert_scale` moves logits by 0.3-1.0. Soft-capping at 30 barely changes such
small logits (~1e-4), so `compute_logits` is checked on its own with large ones.

Every tiny checkpoint has 6 layers, sliding window 8 and page size 8, so the
40-token sequence crosses the window and many pages; sliding layers have head_dim
32 (cache padded to 128), full layers 64 (tpu-inference's hd64 cache layout).
Caches are laid out exactly as tpu-inference's runner allocates them: per-layer
(KV heads, head_dim) from its `get_layer_kv_params` with its padding, KV-shared
layers mapped to their donor's slot by its `compute_kv_share_map`, and (as the
runner does with several KV-cache groups) metadata grouped by layer name, without
entries for KV-shared layers.

To keep compile time down, each model gets one engine, shared by its tests, and
every step is padded to 64 tokens, so one compiled step serves prefill, decode and
ragged batches.
"""

import dataclasses
import re

import jax
import jax.numpy as jnp

import numpy as np
import pytest
import torch

from harness import broken_copy, PAGE_SIZE, Engine, auto_mesh, hf_logits, load_model, vllm_config
from jaxllm.attention import CacheLayout
from jaxllm.checkpoints import cached_checkpoint
from jaxllm.model import gemma4
from jaxllm.model.config import Gemma4Config, UnsupportedConfigError
from jaxllm.model.gemma4 import JaxGemma4ForCausalLM, JaxGemma4ForConditionalGeneration
from jaxllm.model.weights import CheckpointError

ATOL = 1e-4
PAD = 64
RNG = np.random.default_rng(0)
SEQ = [2] + RNG.integers(3, 1000, size=39).tolist()    # 40 tokens
OTHER = [2] + RNG.integers(3, 1000, size=29).tolist()  # 30 tokens

CONFIGS = {
    "dense": {},
    "moe": dict(enable_moe_block=True),
    "k_eq_v": dict(attention_k_eq_v=True),  # full layers: 1 KV head of 64, V = raw K
    # 2 sliding : 1 full; layers 4 (sliding) and 5 (full) read layers 3 and 2.
    "ple_kv_share": dict(hidden_size_per_layer_input=16, num_kv_shared_layers=2, use_double_wide_mlp=True),
}


def runner_cache_layout(path, tp=1):
    """Per layer (KV heads, head_dim) of the cache tpu-inference's runner allocates, and its KV-share map."""
    from tpu_inference import utils
    from tpu_inference.models.common.kv_share import compute_kv_share_map

    text_config = vllm_config(path).model_config.hf_text_config
    specs = []
    for layer_type in text_config.layer_types:
        head_dim, kv_heads = utils.get_layer_kv_params(text_config, layer_type)
        specs.append((utils.get_padded_num_heads(kv_heads, tp), utils.get_padded_head_dim(head_dim)))
    return specs, compute_kv_share_map(text_config)


def make_engine(model, mesh, path, tp=1, **kw):
    specs, kv_share = runner_cache_layout(path, tp)
    return Engine(model, mesh, cache_specs=specs, kv_share=kv_share, num_pages=256, pages_per_req=8, **kw)


@dataclasses.dataclass
class Case:
    name: str
    path: object
    model: object
    mesh: object
    engine: Engine
    seq_logits: np.ndarray
    other_logits: np.ndarray


@pytest.fixture(scope="module", params=list(CONFIGS))
def case(request):
    path = cached_checkpoint("gemma4", "tiny", **CONFIGS[request.param])
    model, mesh = load_model(JaxGemma4ForCausalLM, path)
    return Case(request.param, path, model, mesh, make_engine(model, mesh, path), hf_logits(path, SEQ),
                hf_logits(path, OTHER))


@pytest.fixture(scope="module")
def dense():
    path = cached_checkpoint("gemma4", "tiny")
    return path, *load_model(JaxGemma4ForCausalLM, path)


def test_tiny_checkpoints_exercise_every_gemma4_feature(case):
    c = case.model.config
    sliding = [layer for layer in c.layers if layer.sliding]
    full = [layer for layer in c.layers if not layer.sliding]
    assert sliding and full and c.sliding_window < len(SEQ)
    assert {layer.head_dim for layer in sliding} == {32} and {layer.head_dim for layer in full} == {64}
    assert all(layer.rope_inv_freq[-1] == 0.0 for layer in full)  # proportional RoPE: partial rotation
    assert c.tie_word_embeddings and c.final_logit_softcapping
    name = case.name
    if name == "moe":
        assert c.enable_moe_block and c.top_k_experts < c.num_experts
    if name == "k_eq_v":
        assert all(layer.k_eq_v and layer.num_kv_heads == 1 for layer in full)
        assert not any(layer.k_eq_v for layer in sliding)
    if name == "ple_kv_share":
        assert c.hidden_size_per_layer_input and [layer.kv_donor for layer in c.layers] == [None] * 4 + [3, 2]
        assert c.layers[4].intermediate_size == 2 * c.layers[0].intermediate_size  # double-wide MLP


def test_prefill_matches_hf(case):
    request = case.engine.add(SEQ)
    (logits,) = case.engine.step([(request, len(SEQ))], pad_to=PAD, grouped=True)
    np.testing.assert_allclose(logits, case.seq_logits, atol=ATOL, rtol=0)


def test_prefill_then_decode_matches_longer_prefill(case):
    request = case.engine.add(SEQ)
    (logits,) = case.engine.step([(request, 9)], pad_to=PAD, grouped=True)
    np.testing.assert_allclose(logits, case.seq_logits[:9], atol=ATOL, rtol=0)
    for position in range(9, 26):  # decode past the sliding window and across pages
        (logits,) = case.engine.step([(request, 1)], pad_to=PAD, grouped=True)
        np.testing.assert_allclose(logits[0], case.seq_logits[position], atol=ATOL, rtol=0)


def test_unpadded_one_token_steps_match_hf(case):
    """Steps of a single token with no padding (the runner pads to 16, the benchmarks' driver doesn't)."""
    request = case.engine.add(SEQ)
    case.engine.step([(request, 9)], pad_to=PAD, grouped=True)
    for position in range(9, 12):
        (logits,) = case.engine.step([(request, 1)], grouped=True)
        np.testing.assert_allclose(logits[0], case.seq_logits[position], atol=ATOL, rtol=0)


def test_ragged_batch_matches_hf(case):
    """One step mixing a decode, a chunked-prefill continuation and a fresh prefill, padded."""
    engine = case.engine
    decoding, continuing, fresh = engine.add(SEQ), engine.add(OTHER), engine.add(SEQ[:23])
    engine.step([(decoding, 33)], pad_to=PAD, grouped=True)
    engine.step([(continuing, 10)], pad_to=PAD, grouped=True)
    decode_logits, continue_logits, fresh_logits = engine.step(
        [(decoding, 1), (continuing, 20), (fresh, 23)], pad_to=PAD, grouped=True)
    np.testing.assert_allclose(decode_logits[0], case.seq_logits[33], atol=ATOL, rtol=0)
    np.testing.assert_allclose(continue_logits, case.other_logits[10:30], atol=ATOL, rtol=0)
    np.testing.assert_allclose(fresh_logits, case.seq_logits[:23], atol=ATOL, rtol=0)


def test_single_metadata_object_matches_hf(dense):
    """With one KV-cache group the runner passes one AttentionMetadata, not a dict."""
    path, model, mesh = dense
    engine = make_engine(model, mesh, path, seed=5)
    request = engine.add(SEQ)
    (logits,) = engine.step([(request, len(SEQ))], pad_to=PAD)
    np.testing.assert_allclose(logits, hf_logits(path, SEQ), atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("tp", [1, 4])
def test_cache_layout_is_what_the_runner_allocates(name, tp):
    """Our attention's cache shape per layer equals tpu-inference's for the runner's (padded) KV heads/head_dim."""
    from tpu_inference.runner.kv_cache import get_kv_cache_shape_with_mesh

    path = cached_checkpoint("gemma4", "tiny", **CONFIGS[name])
    config = Gemma4Config.from_hf(vllm_config(path).model_config.hf_config)
    specs, kv_share = runner_cache_layout(path, tp)
    assert kv_share == {i: layer.kv_donor for i, layer in enumerate(config.layers) if layer.kv_donor is not None}
    mesh = auto_mesh(tp)
    for layer, (kv_heads, head_dim) in zip(config.layers, specs):
        assert kv_heads == max(layer.num_kv_heads, tp)  # TP pads KV heads; dispatch repeats ours to match
        ours = CacheLayout(kv_heads, layer.head_dim, 1).cache_shape(16, PAGE_SIZE)
        assert ours == get_kv_cache_shape_with_mesh(mesh, 16, PAGE_SIZE, kv_heads, head_dim, jnp.float32)


def _kv_share_case():
    path = cached_checkpoint("gemma4", "tiny", **CONFIGS["ple_kv_share"])
    return path, *load_model(JaxGemma4ForCausalLM, path)


def test_kv_shared_layers_read_the_donor_cache_and_write_nothing(monkeypatch):
    path, model, mesh = _kv_share_case()
    donors = {i: layer.kv_donor for i, layer in enumerate(model.config.layers) if layer.kv_donor is not None}
    engine = make_engine(model, mesh, path, seed=7)
    request = engine.add(SEQ[:20])

    # Trace one step: a shared layer attends with the cache its donor just returned and the
    # donor's K/V, and is the only kind of layer that may not write.
    calls = []
    real_attention = gemma4.attention

    def spy(q, k, v, kv_cache, *args, **kw):
        out, new_cache = real_attention(q, k, v, kv_cache, *args, **kw)
        calls.append(dict(cache_in=kv_cache, cache_out=new_cache, k=k, v=v, update=kw["update_kv_cache"]))
        return out, new_cache

    monkeypatch.setattr(gemma4, "attention", spy)
    with jax.set_mesh(mesh):
        jax.eval_shape(lambda caches: model(caches, jnp.zeros(20, jnp.int32), _metadata(request, 20), None, None,
                                            engine.layer_slots), engine.caches)
    monkeypatch.undo()
    assert [call["update"] for call in calls] == [i not in donors for i in range(len(calls))]
    for shared, donor in donors.items():
        assert calls[shared]["cache_in"] is calls[donor]["cache_out"]
        assert calls[shared]["k"] is calls[donor]["k"] and calls[shared]["v"] is calls[donor]["v"]

    # Run it; then the same step with the shared layers given (zeroed) slots of their own:
    # the donors' slots must hold exactly what the donors alone wrote, the extra slots nothing.
    (logits,) = engine.step([(request, 20)], pad_to=PAD, grouped=True)
    np.testing.assert_allclose(logits, hf_logits(path, SEQ[:20]), atol=ATOL, rtol=0)
    specs, _ = runner_cache_layout(path)
    alone = Engine(model, mesh, cache_specs=specs, num_pages=256, pages_per_req=8, seed=7)
    request_alone = alone.add(SEQ[:20])
    alone.step([(request_alone, 20)], pad_to=PAD, grouped=True)
    slots, alone_slots = dict(engine.layer_slots), dict(alone.layer_slots)
    for shared, donor in donors.items():
        assert slots[f"layer.{shared}"] == slots[f"layer.{donor}"]
        cache = np.asarray(engine.caches[slots[f"layer.{donor}"]])
        expected = np.asarray(alone.caches[alone_slots[f"layer.{donor}"]])
        np.testing.assert_array_equal(_tokens(cache, request.pages, 20), _tokens(expected, request_alone.pages, 20))
        elsewhere = cache.copy()
        pages = np.asarray(request.pages)
        rows = elsewhere[pages].reshape(-1, *cache.shape[2:])
        rows[:20] = 0
        elsewhere[pages] = rows.reshape(elsewhere[pages].shape)
        assert not elsewhere.any()  # nothing written but the request's 20 tokens
        assert not np.asarray(alone.caches[alone_slots[f"layer.{shared}"]]).any()


def _tokens(cache, pages, n):
    """The cache rows of a request's first n tokens."""
    return cache[np.asarray(pages)].reshape(-1, *cache.shape[2:])[:n]


def _metadata(request, n):
    from tpu_inference.layers.common.attention_metadata import AttentionMetadata

    tables = np.zeros((4, len(request.pages)), np.int32)
    tables[0] = request.pages
    return AttentionMetadata(
        input_positions=jnp.arange(n, dtype=jnp.int32), block_tables=jnp.asarray(tables.reshape(-1)),
        seq_lens=jnp.asarray([n, 0, 0, 0], jnp.int32), query_start_loc=jnp.asarray([0, n, n, n, n], jnp.int32),
        request_distribution=jnp.asarray([0, 0, 1], jnp.int32))


def test_compute_logits_soft_caps_the_tied_embedding(dense):
    _, m, mesh = dense
    hidden = jnp.asarray(RNG.normal(size=(3, m.config.hidden_size)) * 300, jnp.float32)
    with jax.set_mesh(mesh):
        logits = np.asarray(m.compute_logits(hidden))
    raw = np.asarray(hidden) @ np.asarray(m.embed[...]).T
    cap = m.config.final_logit_softcapping
    assert np.abs(raw).max() > 2 * cap
    np.testing.assert_allclose(logits, np.tanh(raw / cap) * cap, atol=1e-4)


def test_multimodal_checkpoint_serves_its_text_model():
    """Including image/video/audio placeholder ids in the text, which both embed as padding."""
    path = cached_checkpoint("gemma4", "tiny", multimodal=True)
    from transformers import AutoConfig, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(path)
    seq = list(SEQ)
    seq[3], seq[7], seq[11] = config.image_token_id, config.video_token_id, config.audio_token_id
    reference = hf_logits(path, seq, AutoModelForImageTextToText)
    model, mesh = load_model(JaxGemma4ForConditionalGeneration, path)
    engine = make_engine(model, mesh, path)
    request = engine.add(seq)
    (logits,) = engine.step([(request, len(seq))], pad_to=PAD, grouped=True)
    np.testing.assert_allclose(logits, reference, atol=ATOL, rtol=0)


def test_tensor_parallel_on_four_devices_pads_kv_heads_like_the_runner():
    """k_eq_v: 2 sliding and 1 full KV head, both padded to 4 for TP 4, as the runner allocates."""
    assert len(jax.devices()) >= 4
    path = cached_checkpoint("gemma4", "tiny", **CONFIGS["k_eq_v"])
    model, mesh = load_model(JaxGemma4ForCausalLM, path, mesh=auto_mesh(4))
    engine = make_engine(model, mesh, path, tp=4)
    request = engine.add(SEQ)
    (logits,) = engine.step([(request, len(SEQ))], pad_to=PAD, grouped=True)
    np.testing.assert_allclose(logits, hf_logits(path, SEQ), atol=ATOL, rtol=0)


def test_missing_tensor_is_named(dense, tmp_path):
    name = "model.layers.5.self_attn.v_proj.weight"
    broken = broken_copy(dense[0], tmp_path, lambda t: t.pop(name))
    with pytest.raises(CheckpointError, match=rf"layers\.5\.attn\.v_proj \(tensor '{re.escape(name)}'\)"):
        load_model(JaxGemma4ForCausalLM, broken)


def test_misshaped_tensor_is_named_with_its_file(dense, tmp_path):
    name = "model.layers.5.self_attn.k_proj.weight"  # a full layer: 64-wide heads
    broken = broken_copy(dense[0], tmp_path, lambda t: t.__setitem__(name, t[name][:-32].contiguous()))
    with pytest.raises(CheckpointError, match=rf"shape mismatch for tensor '{name}' in .*model.safetensors"):
        load_model(JaxGemma4ForCausalLM, broken)


def test_unexpected_tensor_is_named(dense, tmp_path):
    broken = broken_copy(dense[0], tmp_path,
                          lambda t: t.__setitem__("model.layers.0.extra.weight", torch.zeros(2)))
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'model\.layers\.0\.extra\.weight'"):
        load_model(JaxGemma4ForCausalLM, broken)


@pytest.mark.parametrize("field, value", [
    ("hidden_activation", "relu"),
    ("attention_bias", True),
    ("use_bidirectional_attention", "all"),
    ("num_kv_shared_layers", 1),  # the last (full) layer would have no earlier full layer to share
    ("quantization_config", {"quant_method": "fp8", "activation_scheme": "dynamic"}),
])
def test_unsupported_config_is_refused_by_name(dense, field, value):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(dense[0])
    setattr(config, field, value)
    with pytest.raises(UnsupportedConfigError, match=field):
        Gemma4Config.from_hf(config)
