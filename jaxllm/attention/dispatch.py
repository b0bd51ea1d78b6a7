"""The attention call our models make: tpu-inference's Pallas kernel on TPU, ours elsewhere.

Both run under the same `shard_map` partitioning as tpu-inference's
`sharded_ragged_paged_attention`: query/KV heads on the attention-head mesh
axes, the cache on its combined-head axis, request metadata on the data axes.
So tensor parallelism behaves the same on TPU and on simulated CPU devices.

Bidirectional blocks (`block_ids`, Gemma 4's image soft tokens on sliding layers): the
portable attention masks them itself; on TPU a second, non-causal kernel call over one
virtual request per block (`jaxllm.attention.bidirectional`).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
from qwix._src.interception import disable_interceptions
from tpu_inference.layers.common.attention_metadata import AttentionMetadata
from tpu_inference.layers.common.quantization import quantize_kv
from tpu_inference.layers.common.sharding import ShardingAxisName
from tpu_inference.utils import get_mesh_shape_product

from jaxllm import platform
from jaxllm.attention.bidirectional import attend_blocks_on_tpu
from jaxllm.attention.chunked import virtual_batches
from jaxllm.attention.portable import CacheLayout, dtype_packing, ragged_paged_attention


def attention(
    q: jax.Array,         # [T, N, H]
    k: jax.Array,         # [T, K, H]
    v: jax.Array,         # [T, K, H]
    kv_cache: jax.Array,
    metadata: AttentionMetadata,
    mesh: Mesh,
    *,
    sm_scale: float,
    sliding_window: int | None = None,
    chunk_size: int | None = None,
    soft_cap: float | None = None,
    update_kv_cache: bool = True,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
    block_ids: jax.Array | None = None,  # i32[T]: bidirectional block of each token, -1 for none
) -> tuple[jax.Array, jax.Array]:
    """Ragged paged attention for one layer; returns `(out [T, N, H], new_kv_cache)`, as the kernels do.

    A cache in another dtype than K/V (`--kv-cache-dtype fp8`) is quantized: K/V are
    stored as `k / k_scale`, `v / v_scale` in its dtype (tpu-inference's `quantize_kv`,
    static per-tensor scales, as its own models do) and both kernels dequantize on read.
    `block_ids`: a token also attends to this step's tokens of its block ahead of it (within
    the sliding window); see `jaxllm.attention.portable.ragged_paged_attention`.
    """
    md = metadata
    scales = {}
    if kv_cache.dtype != k.dtype:
        k, v = quantize_kv(kv_cache.dtype, k, v, k_scale, v_scale)
        scales = dict(k_scale=k_scale, v_scale=v_scale)
    if block_ids is not None and chunk_size is not None:
        raise NotImplementedError("bidirectional blocks on chunked-local attention")
    if block_ids is not None and not md.use_causal_mask:
        block_ids = None  # every key is visible already
    if platform.on_tpu():
        from tpu_inference.layers.common.attention_interface import sharded_ragged_paged_attention
        requests = (md.seq_lens, md.block_tables, md.query_start_loc, md.request_distribution)
        if chunk_size is not None:
            # The TPU kernel has no chunk mask: causal attention over per-chunk virtual requests.
            if get_mesh_shape_product(mesh, ShardingAxisName.ATTN_DATA) > 1:
                raise NotImplementedError("chunked-local attention on TPU with attention data parallelism")
            requests = virtual_batches(*requests, chunk_size=chunk_size, page_size=kv_cache.shape[1],
                                       num_tokens=q.shape[0])
        out, kv_cache = sharded_ragged_paged_attention(
            mesh, q, k, v, kv_cache, *requests, None, sm_scale, attention_chunk_size=sliding_window,
            update_kv_cache=update_kv_cache, use_causal_mask=md.use_causal_mask,
            attn_logits_soft_cap=soft_cap, **scales)
        if block_ids is not None:
            if get_mesh_shape_product(mesh, ShardingAxisName.ATTN_DATA) > 1:
                raise NotImplementedError("bidirectional blocks on TPU with attention data parallelism")
            if q.shape[-1] == 64:
                raise NotImplementedError("bidirectional blocks on TPU with head dim 64 (tpu-inference's hd64 "
                                          "kernel has no update_kv_cache=False nor non-causal mode)")

            def attend_non_causal(queries, keys, values, cache, *virtual):
                # The cache holds this step's K/V now (the call above, or the donor layer, wrote them).
                return sharded_ragged_paged_attention(
                    mesh, queries, keys, values, cache, *virtual, None, sm_scale,
                    attention_chunk_size=sliding_window, update_kv_cache=False, use_causal_mask=False,
                    attn_logits_soft_cap=soft_cap, **scales)

            out, kv_cache = attend_blocks_on_tpu(attend_non_causal, out, kv_cache, q, k, v, block_ids, *requests,
                                                 sliding_window=sliding_window, page_size=kv_cache.shape[1])
        return out, kv_cache

    k, v = _replicate_kv_heads(mesh, k, v)
    qkv = P(ShardingAxisName.ATTN_DATA, ShardingAxisName.ATTN_HEAD, None)
    cache = P(ShardingAxisName.ATTN_DATA, None, ShardingAxisName.ATTN_HEAD, None, None)
    meta = P(ShardingAxisName.ATTN_DATA)
    kernel = functools.partial(
        _in_layer_layout, sm_scale=sm_scale, sliding_window=sliding_window,
        chunk_size=chunk_size, soft_cap=soft_cap, update_kv_cache=update_kv_cache,
        use_causal_mask=md.use_causal_mask, **scales)
    args = (q, k, v, kv_cache, md.seq_lens, md.block_tables, md.query_start_loc, md.request_distribution)
    if block_ids is not None:
        args += (block_ids,)
    # Qwix (--additional_config quantization rules) intercepts jnp.einsum and lax.dot_general
    # while the model runs and would quantize the attention's own products as activations;
    # it leaves pallas_call alone (qwix/_src/qconfig.py), so on TPU the kernel is opaque to it.
    # The portable attention is kept opaque the same way, so both hosts compute the same thing.
    out, kv_cache = jax.shard_map(
        disable_interceptions(kernel), mesh=mesh, in_specs=(qkv, qkv, qkv, cache, *[meta] * (len(args) - 4)),
        out_specs=(qkv, cache), check_vma=False,
    )(*args)
    return out, kv_cache


def _in_layer_layout(q, k, v, kv_cache, kv_lens, page_indices, cu_q_lens, distribution, block_ids=None,
                     **options):
    """Portable RPA on this device's shard of the cache, viewed in this layer's row layout.

    With the window-aware cache, layers whose rows differ (Gemma 4's sliding and
    global layers) share buffers stored in one layer's layout; a page holds the same
    bytes for each, only fewer tokens of the wider rows. On the local shard, in
    row-major memory, the view is a reshape that moves no data.
    """
    stored = kv_cache.shape
    layout = CacheLayout(k.shape[1], k.shape[2], dtype_packing(kv_cache.dtype))
    row = layout.slots * layout.width
    per_page = math.prod(stored[1:])
    if per_page % row:
        raise ValueError(f"a KV-cache page of shape {stored[1:]} can't hold whole rows of {k.shape[1]} KV heads "
                         f"of size {k.shape[2]} ({row} values)")
    view = kv_cache.reshape(layout.cache_shape(stored[0], per_page // row))
    out, view = ragged_paged_attention(q, k, v, view, kv_lens, page_indices, cu_q_lens, distribution,
                                       block_ids=block_ids, **options)
    return out, view.reshape(stored)


def _replicate_kv_heads(mesh: Mesh, k: jax.Array, v: jax.Array):
    """Repeat KV heads up to the tensor-parallel degree, as the runner sizes the cache."""
    tp = get_mesh_shape_product(mesh, ShardingAxisName.ATTN_HEAD)
    num_kv_heads = k.shape[1]
    if tp <= num_kv_heads:
        return k, v
    if tp % num_kv_heads:
        raise ValueError(f"tensor parallelism {tp} is not a multiple of {num_kv_heads} KV heads")
    return jnp.repeat(k, tp // num_kv_heads, axis=1), jnp.repeat(v, tp // num_kv_heads, axis=1)
