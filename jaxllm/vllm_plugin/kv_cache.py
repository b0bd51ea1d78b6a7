"""Window-aware KV cache for jaxllm's models: each layer keeps only the tokens it can attend to.

tpu-inference 0.32.0 gives every layer of its JAX models a full-length cache
(`KVCacheManager.get_kv_cache_spec` sets `sliding_window = None` for every layer and
never emits a chunked spec). For jaxllm's models this module emits vLLM's own specs:
sliding layers get `SlidingWindowSpec`, Llama 4's chunked layers
`ChunkedLocalAttentionSpec`, the others `FullAttentionSpec`, and KV-shared layers
point at their donor. vLLM then keeps one KV-cache group per kind and returns a
sliding or chunked layer's blocks to the pool once they leave its window.
tpu-inference's built-in models keep their behaviour.

Pages. vLLM's hybrid allocator needs one page size (bytes per block) for every
layer, but Gemma 4's sliding and global layers store different rows (for example
4 heads x 256 vs 4 heads x 512 per token).
- Off TPU, each layer's block size is scaled so that its page has the bytes of
  the largest page (sliding 16 tokens, global 32). All groups share one pool;
  each buffer is stored in one layer's layout and viewed by the others in theirs,
  a free reshape of the local shard (`jaxllm.attention.dispatch`).
- On a TPU that reshape is not free (the TPU's memory is tiled), so layers keep
  the base block size, tpu-inference allocates one buffer per row layout, and the
  page is padded to the sum of those layouts' pages so vLLM's budget counts both;
  where that holds more per request than full-length caches (short contexts),
  the caches stay full length.
If the pages can't be unified (no integer ratio), the cache stays full length,
with a warning.

`JAXLLM_WINDOWED_KV_CACHE`: `auto` (default) as above; `0` full-length caches like
tpu-inference's; `1` requires it and fails at startup where it can't be had.
"""

from __future__ import annotations

import dataclasses
import os

from vllm.logger import init_logger

logger = init_logger("vllm.jaxllm")

MODE_ENV = "JAXLLM_WINDOWED_KV_CACHE"
# Fill new caches with NaN: a page read before it was written (or after it was freed)
# then shows up in the outputs. For tests and debugging.
POISON_ENV = "JAXLLM_POISON_KV_CACHE"
_MODES = ("auto", "0", "1")
_MANAGER_MODULE = "tpu_inference.runner.kv_cache_manager"
_PATCHED = "_jaxllm_kv_cache"


class WindowedKVCacheError(RuntimeError):
    """JAXLLM_WINDOWED_KV_CACHE=1, but this model or configuration can't have it."""


def mode() -> str:
    value = os.environ.get(MODE_ENV, "auto").strip().lower()
    if value not in _MODES:
        raise ValueError(f"{MODE_ENV}={value!r}: expected one of {_MODES}")
    return value


def install() -> None:
    """Patch tpu-inference's KV-cache manager once it is imported (engine processes only)."""
    if mode() != "0":
        # vLLM turns its hybrid KV-cache manager off for any model with chunked attention
        # (a GPU latency concern) unless told otherwise; without it, no chunked group.
        os.environ.setdefault("VLLM_ALLOW_CHUNKED_LOCAL_ATTN_WITH_HYBRID_KV_CACHE", "1")
    from jaxllm.vllm_plugin.runner_fixes import when_imported
    when_imported(_MANAGER_MODULE, _patch_manager)


def _patch_manager(module) -> None:
    cls = module.KVCacheManager
    if getattr(cls.get_kv_cache_spec, _PATCHED, False):
        return
    builtin_spec, builtin_init = cls.get_kv_cache_spec, cls.initialize_kv_cache

    def get_kv_cache_spec(self):
        plan = plan_for(self.runner)
        self._jaxllm_plan = plan
        if plan is None:
            return builtin_spec(self)
        self.shared_kv_cache_layers.update(plan.shared_layers)
        return plan.specs

    def initialize_kv_cache(self, kv_cache_config):
        plan = getattr(self, "_jaxllm_plan", None)
        if plan is None:
            return builtin_init(self, kv_cache_config)
        allocate(self, kv_cache_config, plan)

    get_kv_cache_spec.__wrapped__ = builtin_spec
    initialize_kv_cache.__wrapped__ = builtin_init
    setattr(get_kv_cache_spec, _PATCHED, True)
    cls.get_kv_cache_spec, cls.initialize_kv_cache = get_kv_cache_spec, initialize_kv_cache


@dataclasses.dataclass
class Plan:
    specs: dict                   # layer name -> KVCacheSpec, for layers with a cache of their own
    shared_layers: dict           # KV-shared layer name -> donor layer name
    views: bool                   # layers of different row layouts share buffers (off TPU)
    storage_spec: object = None   # the layout those shared buffers are stored in


def plan_for(runner) -> Plan | None:
    """Per-layer specs for jaxllm's models, or None to leave the runner's own."""
    from jaxllm.vllm_plugin.models import our_class

    model_config = runner.model_config
    cls = our_class(model_config.hf_config)
    if cls is None or mode() == "0":
        return None
    layers = cls.config_class.from_hf(model_config.hf_config).kv_layers()
    max_len = model_config.max_model_len
    windows = [_window(layer, max_len) for layer in layers]
    if not any(kind != "full" for kind, _ in windows):
        return None  # no layer ever sees less than the whole context
    if runner.vllm_config.scheduler_config.disable_hybrid_kv_cache_manager:
        return _refuse("vLLM's hybrid KV-cache manager is disabled (--disable-hybrid-kv-cache-manager, "
                       "or a KV connector without hybrid support), and without it vLLM keeps one "
                       "full-length group")
    return _build_plan(runner, layers, windows)


def _window(layer, max_len: int) -> tuple[str, int | None]:
    """("sliding" | "chunked" | "full", its size); a window as long as any sequence is full attention."""
    if layer.sliding_window is not None and layer.sliding_window < max_len:
        return "sliding", layer.sliding_window
    if layer.chunk_size is not None and layer.chunk_size < max_len:
        return "chunked", layer.chunk_size
    return "full", None


def _build_plan(runner, layers, windows) -> Plan | None:
    from tpu_inference.layers.common.sharding import ShardingAxisName
    from tpu_inference.runner.kv_cache import get_attention_page_size_bytes
    from tpu_inference.utils import get_mesh_shape_product, get_padded_head_dim, get_padded_num_heads
    from vllm.v1.kv_cache_interface import ChunkedLocalAttentionSpec, FullAttentionSpec, SlidingWindowSpec

    from jaxllm.vllm_plugin.host import tpu_present

    tp = get_mesh_shape_product(runner.mesh, ShardingAxisName.ATTN_HEAD)
    base_block = runner.cache_config.block_size
    dtype = runner.kv_cache_dtype

    def row(layer) -> tuple[int, int]:
        return get_padded_num_heads(layer.num_kv_heads, tp), get_padded_head_dim(layer.head_dim)

    def page_bytes(shape: tuple[int, int]) -> int:
        """Bytes of one `base_block`-token page of rows `shape`, as tpu-inference lays them out."""
        return int(get_attention_page_size_bytes(runner.mesh, base_block, *shape, dtype, False,
                                                 runner.attention_backend))

    own = {i: layer for i, layer in enumerate(layers) if layer.kv_donor is None}
    base_page = {shape: page_bytes(shape) for shape in {row(layer) for layer in own.values()}}
    shapes = sorted(base_page, key=lambda shape: -base_page[shape])
    views = len(shapes) > 1 and not tpu_present()
    block_of = {shape: base_block for shape in shapes}
    padded = base_page[shapes[0]]
    if len(shapes) > 1 and views:
        for shape in shapes[1:]:
            ratio, rest = divmod(padded, base_page[shape])
            if rest:
                return _refuse(f"KV rows {shapes[0]} and {shape} (heads, head size) have pages of "
                               f"{padded} and {base_page[shape]} bytes per {base_block}-token "
                               f"block, which no whole block size makes equal")
            block_of[shape] = base_block * ratio
    elif len(shapes) > 1:
        padded = sum(base_page.values())

    specs = {}
    for i, layer in own.items():
        shape = row(layer)
        common = dict(block_size=block_of[shape], num_kv_heads=shape[0], head_size=shape[1], dtype=dtype,
                      page_size_padded=padded)
        kind, size = windows[i]
        if kind == "sliding":
            specs[f"layer.{i}"] = SlidingWindowSpec(sliding_window=size, **common)
        elif kind == "chunked":
            specs[f"layer.{i}"] = ChunkedLocalAttentionSpec(attention_chunk_size=size, **common)
        else:
            specs[f"layer.{i}"] = FullAttentionSpec(**common)
    # At short contexts a window plus the tokens in flight is the whole context, and padded pages
    # (one buffer per row layout) cost more still: compare what one request of max_model_len
    # holds, as vLLM sizes it.
    windowed_bytes = sum(spec.max_memory_usage_bytes(runner.vllm_config) for spec in specs.values())
    full_bytes = sum(base_page[row(layer)] * -(-runner.model_config.max_model_len // base_block)
                     for layer in own.values())
    if windowed_bytes >= full_bytes:
        logger.info("jaxllm: full-length KV cache: at max_model_len %d windows save nothing (%.1f MiB per "
                    "request with them, %.1f without)", runner.model_config.max_model_len,
                    windowed_bytes / 2**20, full_bytes / 2**20)
        return None
    shared = {f"layer.{i}": f"layer.{layer.kv_donor}" for i, layer in enumerate(layers) if layer.kv_donor is not None}
    storage = FullAttentionSpec(block_size=block_of[shapes[0]], num_kv_heads=shapes[0][0],
                                head_size=shapes[0][1], dtype=dtype, page_size_padded=padded)
    kinds = sorted({kind for kind, _ in windows})
    logger.info("jaxllm: window-aware KV cache: %s", ", ".join(
        f"{sum(1 for i in own if windows[i][0] == kind)} {kind}" for kind in kinds)
        + (f", {len(shared)} KV-shared" if shared else "")
        + (f"; rows {shapes} share {padded}-byte pages" if len(shapes) > 1 else ""))
    return Plan(specs, shared, views, storage)


def _refuse(reason: str) -> None:
    if mode() == "1":
        raise WindowedKVCacheError(f"{MODE_ENV}=1, but the window-aware KV cache is not possible: {reason}")
    logger.warning("jaxllm: window-aware KV cache OFF, every layer keeps the full context: %s "
                   "(set %s=0 to silence this)", reason, MODE_ENV)
    return None


def allocate(manager, kv_cache_config, plan: Plan) -> None:
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
            layout = plan.storage_spec if plan.views else spec
            region = (tensor.offset + j * tensor.layer_stride,
                      None if plan.views else (spec.num_kv_heads, spec.head_size))
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
