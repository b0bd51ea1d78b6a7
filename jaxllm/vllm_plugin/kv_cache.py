"""The window-aware KV cache in tpu-inference's runner (the plan itself is `kv_plan.py`).

Two methods of tpu-inference's `KVCacheManager` are patched, for jaxllm's models
only (a runner whose model is one of ours; anything else keeps tpu-inference's
behaviour): `get_kv_cache_spec` reports the plan's specs to vLLM, and
`initialize_kv_cache` allocates the buffers vLLM's pool needs. Each computes the
plan from the runner, so nothing is handed between them.
"""

from __future__ import annotations

import functools
import os

from vllm.logger import init_logger

from jaxllm import platform
from jaxllm.vllm_plugin import kv_plan
from jaxllm.vllm_plugin.patching import Patch, install

logger = init_logger("vllm.jaxllm")

# Fill new caches with NaN: a page read before it was written (or after it was freed)
# then shows up in the outputs. For tests and debugging.
POISON_ENV = "JAXLLM_POISON_KV_CACHE"
_MANAGER = "tpu_inference.runner.kv_cache_manager"


def install_all() -> None:
    if kv_plan.mode() is not kv_plan.Mode.OFF:
        # vLLM turns its hybrid KV-cache manager off for any model with chunked attention
        # (a GPU latency concern) unless told otherwise; without it, no chunked group.
        os.environ.setdefault("VLLM_ALLOW_CHUNKED_LOCAL_ATTN_WITH_HYBRID_KV_CACHE", "1")
    install(Patch(_MANAGER, "KVCacheManager.get_kv_cache_spec",
                  "per-layer sliding / chunked / full specs for jaxllm's models", _reporting_our_specs))
    install(Patch(_MANAGER, "KVCacheManager.initialize_kv_cache",
                  "one buffer per region of vLLM's pool for jaxllm's models", _allocating_our_buffers))


def plan_for(runner) -> kv_plan.KVCachePlan | None:
    """The plan when the runner serves one of our models, else None (tpu-inference's own cache)."""
    from jaxllm.model.causal_lm import CausalLM

    if not isinstance(runner.model, CausalLM):
        return None  # MODEL_IMPL_TYPE=vllm, a fallback to vLLM's model, or a built-in model
    return kv_plan.plan(runner.model.config.kv_layers(), runner, on_tpu=platform.on_tpu())


def _reporting_our_specs(builtin):
    @functools.wraps(builtin)
    def get_kv_cache_spec(manager):
        plan = plan_for(manager.runner)
        if plan is None:
            return builtin(manager)
        logger.info("jaxllm: window-aware KV cache: %s", plan.summary)
        manager.shared_kv_cache_layers.update(plan.shared_layers)
        return plan.specs
    return get_kv_cache_spec


def _allocating_our_buffers(builtin):
    @functools.wraps(builtin)
    def initialize_kv_cache(manager, kv_cache_config):
        plan = plan_for(manager.runner)
        if plan is None:
            return builtin(manager, kv_cache_config)
        allocate(manager, kv_cache_config, plan)
    return initialize_kv_cache


def allocate(manager, kv_cache_config, plan: kv_plan.KVCachePlan) -> None:
    """One buffer per region of vLLM's pool (per region and row layout on TPU).

    vLLM's plan overlays the groups: layer j of every group owns the bytes at
    `offset + j * layer_stride` of one pool, and a block id belongs to one group at
    a time, so those layers can share one buffer. tpu-inference's allocator keys
    buffers by row layout, and by tensor when a group has a single layer, which
    would give each group a buffer of its own, several times vLLM's budget.
    """
    from tpu_inference.layers.common.sharding import ShardingAxisName
    from tpu_inference.runner.kv_cache import create_kv_caches
    from tpu_inference.utils import get_mesh_shape_product, to_jax_dtype

    runner = manager.runner
    manager.maybe_reinitialize_input_batch(kv_cache_config)  # each group's own block size
    batch_shards = get_mesh_shape_product(runner.mesh, ShardingAxisName.BATCH)
    num_blocks = kv_cache_config.num_blocks // batch_shards * batch_shards
    spec_of = {name: group.kv_cache_spec for group in kv_cache_config.kv_cache_groups for name in group.layer_names}
    buffers: dict[tuple, int] = {}
    for tensor in kv_cache_config.kv_cache_tensors:
        for j, name in enumerate(tensor.layers):
            spec = spec_of[name]
            layout = plan.storage or spec
            region = (tensor.offset + j * tensor.layer_stride,
                      None if plan.storage else (spec.num_kv_heads, spec.head_size))
            if region not in buffers:
                runner.kv_caches.append(create_kv_caches(
                    num_blocks, layout.block_size, layout.num_kv_heads, layout.head_size, runner.mesh, [name],
                    cache_dtype=to_jax_dtype(layout.dtype), attention_backend=runner.attention_backend)[0])
                buffers[region] = len(runner.kv_caches) - 1
            runner.layer_name_to_kvcache_index[name] = buffers[region]
    if os.environ.get(POISON_ENV) == "1":
        import jax
        import jax.numpy as jnp
        poison = jax.jit(lambda cache: jnp.full_like(cache, jnp.nan), donate_argnums=0)
        runner.kv_caches[:] = [poison(cache) for cache in runner.kv_caches]
    for layer, donor in manager.shared_kv_cache_layers.items():
        runner.layer_name_to_kvcache_index[layer] = runner.layer_name_to_kvcache_index[donor]
    cache = runner.kv_caches[0]
    logger.info("jaxllm: KV cache: %d buffers of %s %s (%.2f GiB) for %d layers, %d blocks in %d groups",
                len(runner.kv_caches), cache.shape, cache.dtype,
                sum(c.nbytes for c in runner.kv_caches) / 2**30, len(runner.layer_name_to_kvcache_index),
                num_blocks, len(kv_cache_config.kv_cache_groups))
