"""The window-aware KV-cache plan (`jaxllm.vllm_plugin.kv_cache.plan_for`) on real vLLM configs.

No weights: the plan is made from an HF config folder, vLLM's engine config and our
model built abstractly (as the runner holds it), with the runner's attributes the
plan reads, and fed to vLLM's own planner. The end-to-end behaviour is in
test_windowed_kv_cache.py.
"""

from __future__ import annotations

import copy
import logging
from types import SimpleNamespace

import jax
import pytest
import torch
from flax import nnx
from transformers import Gemma4TextConfig, Llama4TextConfig
from vllm.v1.kv_cache_interface import ChunkedLocalAttentionSpec, FullAttentionSpec, SlidingWindowSpec

import jaxllm.vllm_plugin as plugin
from jaxllm import platform
from jaxllm.vllm_plugin import kv_cache, kv_plan
from jaxllm.vllm_plugin.host import plain_mesh
from jaxllm.vllm_plugin.models import our_class

# Gemma 4 31B's attention: 5 sliding layers (16 KV heads x 256, window 1024) per global one (4 x 512).
GEMMA4_31B = dict(num_hidden_layers=12, hidden_size=256, num_attention_heads=32, num_key_value_heads=16,
                  head_dim=256, num_global_key_value_heads=4, global_head_dim=512, attention_k_eq_v=True,
                  sliding_window=1024, layer_types=(["sliding_attention"] * 5 + ["full_attention"]) * 2)


@pytest.fixture(scope="module", autouse=True)
def registered():
    plugin.register()


def engine_config(tmp_path, arch: str, max_len: int, **overrides):
    from vllm.engine.arg_utils import EngineArgs

    config_class, name = (Gemma4TextConfig, "Gemma4ForCausalLM") if arch == "gemma4" else \
        (Llama4TextConfig, "Llama4ForCausalLM")
    engine_overrides = overrides.pop("engine", {})
    config = config_class(**overrides, max_position_embeddings=max(max_len, 8192))
    config.architectures = [name]
    folder = tmp_path / f"{arch}-{max_len}"
    config.save_pretrained(folder)
    return EngineArgs(model=str(folder), max_model_len=max_len, dtype="bfloat16", load_format="dummy",
                      skip_tokenizer_init=True, **engine_overrides).create_engine_config()


def runner_for(vllm_config, model=None, kv_cache_dtype=torch.bfloat16):
    """The runner's attributes the plan reads; `model`: what it serves (default: ours, built abstractly)."""
    mesh = plain_mesh((1, 1), ("data", "model"), devices=jax.devices()[:1])
    if model is None:
        cls = our_class(vllm_config.model_config.hf_config)
        with jax.set_mesh(mesh):
            model = nnx.eval_shape(lambda: cls(vllm_config, jax.random.key(0), mesh))
    return SimpleNamespace(model=model, model_config=vllm_config.model_config, vllm_config=vllm_config,
                           cache_config=vllm_config.cache_config, parallel_config=vllm_config.parallel_config,
                           speculative_config=None, mesh=mesh, kv_cache_dtype=kv_cache_dtype,
                           attention_backend=None)


@pytest.fixture
def on_tpu(monkeypatch):
    monkeypatch.setattr(platform, "on_tpu", lambda: True)


def test_gemma4_sliding_and_global_rows_share_one_page_size(tmp_path):
    vllm_config = engine_config(tmp_path, "gemma4", 32768, **GEMMA4_31B)
    plan = kv_cache.plan_for(runner_for(vllm_config))
    base = vllm_config.cache_config.block_size
    sliding = [s for s in plan.specs.values() if isinstance(s, SlidingWindowSpec)]
    full = [s for s in plan.specs.values() if type(s) is FullAttentionSpec]
    assert (len(sliding), len(full)) == (10, 2)
    assert {s.sliding_window for s in sliding} == {1024}
    # A global row (4 x 512) is half a sliding row (16 x 256): twice the tokens per page.
    assert {s.block_size for s in sliding} == {base} and {s.block_size for s in full} == {2 * base}
    assert len({s.page_size_bytes for s in plan.specs.values()}) == 1
    assert (plan.storage.num_kv_heads, plan.storage.head_size) == (16, 256)


def test_on_tpu_each_row_layout_gets_its_own_buffer_or_the_cache_stays_full(tmp_path, on_tpu):
    """One buffer per row layout, pages padded to both; at 8k that holds more than full-length caches."""
    long = kv_cache.plan_for(runner_for(engine_config(tmp_path, "gemma4", 131072, **GEMMA4_31B)))
    assert long.storage is None
    assert len({s.block_size for s in long.specs.values()}) == 1
    sliding_page, global_page = 2 * 16 * 256 * 2, 2 * 4 * 512 * 2  # K and V, bf16, per token
    assert {s.page_size_bytes for s in long.specs.values()} == {(sliding_page + global_page) * 32 * 4}
    assert kv_cache.plan_for(runner_for(engine_config(tmp_path, "gemma4", 8192, **GEMMA4_31B))) is None


def test_no_plan_unless_our_model_serves(tmp_path):
    """With MODEL_IMPL_TYPE=vllm, or a fallback to vLLM's torch model, the runner serves another
    model whose layers are named otherwise: tpu-inference keeps its own cache."""
    vllm_config = engine_config(tmp_path, "gemma4", 32768, **GEMMA4_31B)
    assert kv_cache.plan_for(runner_for(vllm_config, model=object())) is None


def test_kv_shared_layers_point_at_their_donors(tmp_path):
    vllm_config = engine_config(tmp_path, "gemma4", 32768, **{**GEMMA4_31B, "num_kv_shared_layers": 4})
    plan = kv_cache.plan_for(runner_for(vllm_config))
    # Layers 8-11 share; each reads the last earlier layer of its type (7: sliding, 5: full).
    assert plan.shared_layers == {"layer.8": "layer.7", "layer.9": "layer.7", "layer.10": "layer.7",
                                  "layer.11": "layer.5"}
    assert sorted(plan.specs) == sorted(f"layer.{i}" for i in range(8))


def test_llama4_chunked_layers_get_chunked_specs_only_past_one_chunk(tmp_path):
    overrides = dict(num_hidden_layers=8, hidden_size=256, intermediate_size=256, intermediate_size_mlp=512,
                     attention_chunk_size=1024)
    plan = kv_cache.plan_for(runner_for(engine_config(tmp_path, "llama4", 32768, **overrides)))
    kinds = [type(plan.specs[f"layer.{i}"]) for i in range(8)]
    # no_rope_layers: every 4th layer is NoPE with global attention.
    assert kinds == [ChunkedLocalAttentionSpec] * 3 + [FullAttentionSpec] + [ChunkedLocalAttentionSpec] * 3 \
        + [FullAttentionSpec]
    assert plan.specs["layer.0"].attention_chunk_size == 1024
    assert kv_cache.plan_for(runner_for(engine_config(tmp_path, "llama4", 1024, **overrides))) is None
    # Past one chunk, but a chunk plus the tokens in flight (2 x 2048) is the whole context: no saving.
    assert kv_cache.plan_for(runner_for(engine_config(tmp_path, "llama4", 4096, **overrides))) is None


def test_window_aware_cache_admits_more_long_requests_than_full_length(tmp_path):
    from vllm.v1.attention.backends.utils import record_kv_cache_layout
    from vllm.v1.core.kv_cache_planning import get_kv_cache_configs
    from vllm.v1.core.kv_cache_utils import get_kv_cache_capacity
    from tpu_inference.runner.kv_cache_manager import KVCacheManager

    vllm_config = engine_config(tmp_path, "gemma4", 32768, **GEMMA4_31B)

    def concurrency(mode, monkeypatch):
        monkeypatch.setenv(kv_plan.MODE_ENV, mode)
        config = copy.deepcopy(vllm_config)
        record_kv_cache_layout(config.cache_config, "LBNHC")
        specs = KVCacheManager(runner_for(config)).get_kv_cache_spec()
        return get_kv_cache_capacity(config, get_kv_cache_configs(config, [specs], [8 * 2**30])[0])[1]

    with pytest.MonkeyPatch.context() as mp:
        full, windowed = concurrency("0", mp), concurrency("auto", mp)
    assert windowed > 4 * full  # 4.28x for this pattern at 32k with 2048-token prefill chunks


def test_bad_combinations_fail_at_startup_or_warn(tmp_path, monkeypatch, caplog):
    # 3 KV heads x 256 vs 2 x 512: pages of 1536 and 2048 bytes per token, no whole ratio.
    odd = {**GEMMA4_31B, "num_key_value_heads": 3, "num_attention_heads": 6, "num_global_key_value_heads": 2}
    runner = runner_for(engine_config(tmp_path, "gemma4", 32768, **odd))
    monkeypatch.setenv(kv_plan.MODE_ENV, "1")
    with pytest.raises(kv_plan.WindowedKVCacheError, match=r"rows \[\(2, 512\), \(3, 256\)\]"):
        kv_cache.plan_for(runner)
    monkeypatch.setenv(kv_plan.MODE_ENV, "auto")
    jaxllm_logger = logging.getLogger("vllm.jaxllm")  # vLLM's loggers don't propagate to the root
    jaxllm_logger.addHandler(caplog.handler)
    try:
        assert kv_cache.plan_for(runner) is None
    finally:
        jaxllm_logger.removeHandler(caplog.handler)
    assert "window-aware KV cache OFF" in caplog.text

    hybrid_off = engine_config(tmp_path, "gemma4", 32768, **GEMMA4_31B,
                               engine={"disable_hybrid_kv_cache_manager": True})
    monkeypatch.setenv(kv_plan.MODE_ENV, "1")
    with pytest.raises(kv_plan.WindowedKVCacheError, match="hybrid KV-cache manager is disabled"):
        kv_cache.plan_for(runner_for(hybrid_off))
    monkeypatch.setenv(kv_plan.MODE_ENV, "sometimes")
    with pytest.raises(ValueError, match="JAXLLM_WINDOWED_KV_CACHE='sometimes'"):
        kv_cache.plan_for(runner_for(hybrid_off))


def test_allocation_honours_num_gpu_blocks_override(tmp_path):
    """With --num-gpu-blocks-override the buffers have exactly that many pages, whatever the budget."""
    from vllm.v1.attention.backends.utils import record_kv_cache_layout
    from vllm.v1.core.kv_cache_planning import get_kv_cache_configs

    small = dict(GEMMA4_31B, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=128,
                 num_global_key_value_heads=1, global_head_dim=256, sliding_window=64)
    vllm_config = engine_config(tmp_path, "gemma4", 16384, **small, engine={"num_gpu_blocks_override": 2400})
    record_kv_cache_layout(vllm_config.cache_config, "LBNHC")
    runner = runner_for(vllm_config)
    plan = kv_cache.plan_for(runner)
    kv_cache_config = get_kv_cache_configs(vllm_config, [plan.specs], [64 * 2**30])[0]
    runner.kv_caches, runner.layer_name_to_kvcache_index = [], {}
    manager = SimpleNamespace(runner=runner, shared_kv_cache_layers={},
                              maybe_reinitialize_input_batch=lambda config: None)
    kv_cache.allocate(manager, kv_cache_config, plan)
    assert {cache.shape[0] for cache in runner.kv_caches} == {2400}
    assert len(runner.layer_name_to_kvcache_index) == 12


@pytest.mark.parametrize("tpu", [False, True], ids=["off-tpu", "on-tpu"])
def test_fp8_kv_cache_pages_hold_half_the_bytes(tmp_path, monkeypatch, tpu):
    """--kv-cache-dtype fp8: the runner's kv_cache_dtype is float8_e4m3fn, and the plan counts 1 byte per value
    (tpu-inference's page layout packs 4 per 32 bits), so every page is half its bf16 size, on TPU and off,
    and vLLM's planner fits twice the blocks, and twice the requests, in the same budget."""
    from vllm.v1.attention.backends.utils import record_kv_cache_layout
    from vllm.v1.core.kv_cache_planning import get_kv_cache_configs
    from vllm.v1.core.kv_cache_utils import get_kv_cache_capacity

    monkeypatch.setattr(platform, "on_tpu", lambda: tpu)
    vllm_config = engine_config(tmp_path, "gemma4", 131072, **GEMMA4_31B)
    plans = {dtype: kv_cache.plan_for(runner_for(vllm_config, kv_cache_dtype=dtype))
             for dtype in (torch.bfloat16, torch.float8_e4m3fn)}
    bf16, fp8 = plans[torch.bfloat16], plans[torch.float8_e4m3fn]
    assert bf16.specs.keys() == fp8.specs.keys()
    for name in bf16.specs:
        assert fp8.specs[name].page_size_bytes * 2 == bf16.specs[name].page_size_bytes
        assert fp8.specs[name].block_size == bf16.specs[name].block_size

    def blocks_and_concurrency(plan):
        config = copy.deepcopy(vllm_config)
        record_kv_cache_layout(config.cache_config, "LBNHC")
        kv_cache_config = get_kv_cache_configs(config, [plan.specs], [8 * 2**30])[0]
        return kv_cache_config.num_blocks, get_kv_cache_capacity(config, kv_cache_config)[1]

    (fp8_blocks, fp8_requests), (bf16_blocks, bf16_requests) = blocks_and_concurrency(fp8), blocks_and_concurrency(bf16)
    assert fp8_blocks == 2 * bf16_blocks
    assert fp8_requests == pytest.approx(2 * bf16_requests, rel=1e-4)  # (vLLM rounds its token count)
