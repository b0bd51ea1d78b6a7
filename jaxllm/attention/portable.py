"""Ragged paged attention in pure JAX, for hosts where tpu-inference's Pallas kernel can't run.

Same arguments, cache layout and results as tpu-inference's RPA v3 kernel
(`kernels/ragged_paged_attention/v3/kernel.py`), plus a Llama 4 chunked-local mask,
Gemma 4's bidirectional blocks (`block_ids`: runs of this step's tokens that also
attend to each other ahead, within the sliding window), and quantized (fp8) caches
with the kernel's static `q/k/v_scale`.

Layout. A batch is `T` query tokens packed request after request (`cu_q_lens`),
decode-only requests first (`distribution = (decode_end, prefill_end, num_seqs)`).
Request `r` owns pages `page_indices[r * pages_per_seq:]` holding its `kv_lens[r]`
tokens, the new ones last. Each cache row (one token) is
`[combined_slots // packing, packing, width]`; see `CacheLayout`.

Write, then read. This step's new tokens are scattered into the cache first and
the loops read the updated cache. A request may read pages another request of the
same step writes: vLLM's prefix cache hands out blocks as soon as a scheduled step
will fill them, so a request arriving with the same prefix can be scheduled beside
the one computing it (as on GPU, where each layer writes its KV before attending).
With the cache donated, as the runner donates it, the scatter is in place and XLA
copies nothing. With `update_kv_cache=False` nothing is written and each request
sees its own new tokens through the overlay.

Cost. Everything runs in `lax.while_loop`s whose trip counts come from the
metadata, so work follows the tokens actually attended, not `max_model_len`:
- decode rows go `Tiling.decode_tile` at a time, each row gathering its own pages,
  over the KV blocks (`Tiling.decode_kv_tokens`) that the rows in the tile need; fewer than
  `Tiling.few_decode_rows` rows go one at a time, since a tile gathers and computes
  all its rows, live or not;
- every other request goes query block by query block, over only the KV blocks
  its causal / sliding / chunked mask can reach (with `block_ids`, up to the end
  of the last query's block).
Softmax is the online (flash) form in fp32, so no `[q, kv_len]` score matrix exists.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax


@dataclasses.dataclass(frozen=True)
class Tiling:
    """How the loops cut the work: big enough that CPU loop overhead is small, small
    enough that a tile's gathered pages stay in cache."""
    decode_tile: int = 8        # decode rows per tile
    few_decode_rows: int = 4    # below this many decode rows, tiles of one row (batch 1: 1/8 of the work)
    decode_kv_tokens: int = 128  # KV tokens per block of a decode row (each row gathers its own)
    query_block: int = 128      # query tokens per prefill block
    kv_block_tokens: int = 256  # KV tokens per block of a prefill block


def _align(x: int, a: int) -> int:
    return (x + a - 1) // a * a


def dtype_packing(dtype) -> int:
    """Values packed in 32 bits: 1 for fp32, 2 for bf16."""
    return 4 // jnp.dtype(dtype).itemsize


@dataclasses.dataclass(frozen=True)
class CacheLayout:
    """Where K and V of each KV head sit inside one token's cache row.

    The row is viewed flat as `[slots, width]`. tpu-inference uses two layouts:
    - standard (`head_dim != 64`): slot 2k holds K of head k and slot 2k+1 its V,
      each zero-padded to a width that is a multiple of 128;
    - hd64 (`head_dim == 64`, its `kernel_hd64.py`): slot k holds K and V of head
      k side by side, `[K(64) | V(64)]`.
    """
    num_kv_heads: int
    head_dim: int
    packing: int

    @property
    def side_by_side(self) -> bool:
        return self.head_dim == 64

    @property
    def slots(self) -> int:
        heads = self.num_kv_heads if self.side_by_side else 2 * self.num_kv_heads
        return _align(heads, self.packing)

    @property
    def width(self) -> int:
        return 128 if self.side_by_side else _align(self.head_dim, 128)

    def cache_shape(self, num_pages: int, page_size: int) -> tuple[int, ...]:
        return (num_pages, page_size, self.slots // self.packing, self.packing, self.width)

    def merge(self, k: jax.Array, v: jax.Array) -> jax.Array:
        """[T, K, H] x2 -> cache rows [T, slots // packing, packing, width]."""
        t, heads, h = k.shape
        if self.side_by_side:
            rows = jnp.concatenate([k, v], axis=-1)                      # [T, K, 2H]
        else:
            rows = jnp.stack([k, v], axis=2).reshape(t, 2 * heads, h)    # [T, 2K, H]
        rows = jnp.pad(rows, ((0, 0), (0, self.slots - rows.shape[1]), (0, self.width - rows.shape[2])))
        return rows.reshape(t, self.slots // self.packing, self.packing, self.width)

    def split(self, rows: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Cache rows [..., slots // packing, packing, width] -> K, V [..., K, H]."""
        rows = rows.reshape(*rows.shape[:-3], self.slots, self.width)
        heads, h = self.num_kv_heads, self.head_dim
        if self.side_by_side:
            return rows[..., :heads, :h], rows[..., :heads, h:2 * h]
        return rows[..., 0:2 * heads:2, :h], rows[..., 1:2 * heads:2, :h]


def ragged_paged_attention(
    queries: jax.Array,       # [T, N, H]
    keys: jax.Array,          # [T, K, H]
    values: jax.Array,        # [T, K, H]
    kv_cache: jax.Array,      # [num_pages, page_size, slots // packing, packing, width]
    kv_lens: jax.Array,       # i32[max_num_seqs]
    page_indices: jax.Array,  # i32[max_num_seqs * pages_per_seq]
    cu_q_lens: jax.Array,     # i32[max_num_seqs + 1]
    distribution: jax.Array,  # i32[3]
    attention_sink: jax.Array | None = None,  # f32[N], an extra softmax logit per head
    *,
    block_ids: jax.Array | None = None,  # i32[T]: bidirectional block of each token, -1 for none
    sm_scale: float = 1.0,
    sliding_window: int | None = None,
    chunk_size: int | None = None,
    soft_cap: float | None = None,
    update_kv_cache: bool = True,
    use_causal_mask: bool = True,
    q_scale: float | None = None,
    k_scale: float | None = None,
    v_scale: float | None = None,
    tiling: Tiling = Tiling(),
    # The Pallas kernels' block sizes, which tpu-inference's sharded call forwards from
    # RPA_V3_*_BLOCK_SIZES (and the batched kernel's decode_query_size): `tiling` is ours.
    d_block_sizes=None,
    p_block_sizes=None,
    m_block_sizes=None,
    decode_query_size: int = 1,
) -> tuple[jax.Array, jax.Array]:
    """Attention of `queries` over each request's paged KV; returns `(out [T, N, H], new_kv_cache)`.

    The new `keys`/`values` are attended to like the rest and written into their
    pages. With `update_kv_cache=False` they are still attended to, but the cache
    comes back unchanged (KV-shared layers).
    Masks: causal (unless `use_causal_mask=False`), plus `q - sliding_window < k`,
    plus `k // chunk_size == q // chunk_size`; `soft_cap` squashes scores with tanh.
    A quantized (fp8) cache takes keys/values already quantized to its dtype
    (tpu-inference's `quantize_kv`) and their static scales: stored values are read
    exactly (fp8 -> fp32), scores scaled by `k_scale`, `p @ v` by `v_scale`, as the kernel does.
    `block_ids`: a query may also attend to the keys ahead of it that are tokens of
    this step with its (non-negative) id, the other masks still applying (so with a
    sliding window: AND(window, OR(causal, same block)), as transformers masks Gemma 4's
    sliding layers for images). Each id must mark one contiguous run of one request's
    tokens; decode requests (one token) are unaffected.
    """
    if sliding_window is not None and sliding_window <= 0:
        raise ValueError(f"sliding_window must be positive, got {sliding_window}")
    if chunk_size is not None and chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    num_tokens, num_heads, head_dim = queries.shape
    num_kv_heads = keys.shape[1]
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads are not a multiple of {num_kv_heads} KV heads")
    layout = CacheLayout(num_kv_heads, head_dim, dtype_packing(kv_cache.dtype))
    num_pages, page_size = kv_cache.shape[:2]
    if kv_cache.shape != layout.cache_shape(num_pages, page_size):
        raise ValueError(f"kv_cache shape {kv_cache.shape} does not match {num_kv_heads} KV heads of size "
                         f"{head_dim} in {kv_cache.dtype}: expected {layout.cache_shape(num_pages, page_size)}")
    if keys.dtype != kv_cache.dtype or values.dtype != kv_cache.dtype:
        raise ValueError(f"keys/values dtype {keys.dtype}/{values.dtype} != kv_cache dtype {kv_cache.dtype}: "
                         "quantize them to the cache's dtype first (tpu-inference's quantize_kv), as the "
                         "TPU kernel requires")
    if not jnp.issubdtype(kv_cache.dtype, jnp.floating):
        raise ValueError(f"kv_cache dtype {kv_cache.dtype}: only floating-point caches are supported, as in "
                         "the TPU kernel")
    if block_ids is not None and block_ids.shape != (num_tokens,):
        raise ValueError(f"block_ids shape {block_ids.shape} != ({num_tokens},), one per query token")

    batch = _Batch.build(kv_lens, page_indices, cu_q_lens, distribution, num_tokens)
    masks = _Masks(use_causal_mask, sliding_window, chunk_size)
    # Quantized caches, as the kernel dequantizes them (kernel.py, flash_attention_step1/2): the cache
    # and the new K/V hold values / scale; scores are scaled by sm_scale * k_scale (* q_scale, with
    # the queries quantized to the cache's dtype the way the kernel does it), p @ v by v_scale.
    score_scale = sm_scale * (1.0 if k_scale is None else k_scale) * (1.0 if q_scale is None else q_scale)
    scored_queries = queries if q_scale is None else _quantize_like_kernel(queries, q_scale, kv_cache.dtype)
    pad = max(tiling.decode_tile, tiling.query_block)
    blocks = None if block_ids is None else _Blocks.build(block_ids, batch, pad)
    # Written first, the cache holds this step's K/V in the values `keys`/`values` carry (already in
    # its dtype); only a call that writes nothing reads them from beside the cache.
    overlay = None if update_kv_cache else (keys.astype(jnp.float32), values.astype(jnp.float32))
    attend = _Attend(layout, batch, *(overlay or (None, None)), page_size, tiling, masks, score_scale, v_scale,
                     soft_cap, attention_sink, num_heads, queries.dtype, blocks)

    if update_kv_cache:
        kv_cache = _write_kv(kv_cache, layout.merge(keys, values), batch, page_size)
    q = jnp.pad(scored_queries, ((0, pad), (0, 0), (0, 0)))
    q = q.reshape(num_tokens + pad, num_kv_heads, num_heads // num_kv_heads, head_dim)
    out = jnp.zeros(q.shape, queries.dtype)
    out = lax.cond(batch.decode_tokens < tiling.few_decode_rows,
                   lambda out: attend.decode_rows(q, out, kv_cache, tile=1),
                   lambda out: attend.decode_rows(q, out, kv_cache, tile=tiling.decode_tile), out)
    out = attend.query_blocks(q, out, kv_cache)
    return out[:num_tokens].reshape(num_tokens, num_heads, head_dim), kv_cache


def _quantize_like_kernel(queries: jax.Array, q_scale: float, dtype) -> jax.Array:
    """Queries divided by `q_scale`, clipped to `dtype`'s range and cast to it, as the TPU kernel does."""
    q = queries / q_scale
    if jnp.issubdtype(dtype, jnp.floating):
        info = jnp.finfo(dtype)
        q = jnp.clip(q, float(info.min), float(info.max))
    return q.astype(dtype)


@dataclasses.dataclass(frozen=True)
class _Batch:
    """Per-request and per-token views of the ragged metadata."""
    kv_lens: jax.Array
    page_indices: jax.Array
    pages_per_seq: int
    q_starts: jax.Array      # [R]
    q_lens: jax.Array        # [R], 0 past num_seqs
    decode_end: jax.Array    # decode requests are [0, decode_end)
    decode_tokens: jax.Array  # ... and their tokens [0, decode_tokens)
    num_seqs: jax.Array
    token_request: jax.Array  # [T]
    token_position: jax.Array  # [T], position in its sequence
    token_valid: jax.Array     # [T], False for padding tokens

    @classmethod
    def build(cls, kv_lens, page_indices, cu_q_lens, distribution, num_tokens):
        max_seqs = kv_lens.shape[0]
        num_seqs = distribution[2]
        live = jnp.arange(max_seqs) < num_seqs
        q_starts = cu_q_lens[:-1]
        q_lens = jnp.where(live, cu_q_lens[1:] - q_starts, 0)
        # Entries past num_seqs are padding with arbitrary values: make the ends
        # monotone so that a token maps to the live request that contains it.
        ends = jnp.where(live, cu_q_lens[1:], jnp.iinfo(jnp.int32).max)
        t = jnp.arange(num_tokens, dtype=jnp.int32)
        request = jnp.minimum(jnp.searchsorted(ends, t, side="right"), max_seqs - 1).astype(jnp.int32)
        valid = t < cu_q_lens[num_seqs]
        position = kv_lens[request] - q_lens[request] + (t - q_starts[request])
        return cls(kv_lens, page_indices, page_indices.shape[0] // max_seqs, q_starts, q_lens,
                   distribution[0], cu_q_lens[distribution[0]], num_seqs, request, position, valid)

    def pages(self, request, first_page, count):
        """Page ids [..., count] of `request` from its `first_page`; past its table the ids are junk but in range."""
        idx = request[..., None] * self.pages_per_seq + first_page[..., None] + jnp.arange(count)
        return self.page_indices[jnp.minimum(idx, self.page_indices.shape[0] - 1)]


def _write_kv(kv_cache, rows, batch: _Batch, page_size):
    """Scatter each live token's cache row into its page slot; padding tokens write nothing."""
    page = batch.pages(batch.token_request, batch.token_position // page_size, 1)[:, 0]
    page = jnp.where(batch.token_valid, page, kv_cache.shape[0])  # out of bounds -> dropped
    # Indexed by (page, slot) on the cache's own shape: a flattened view would
    # make XLA scatter in another layout and copy the whole cache back.
    return kv_cache.at[page, batch.token_position % page_size].set(rows, mode="drop")


@dataclasses.dataclass(frozen=True)
class _Blocks:
    """Bidirectional blocks: per token (padded by `pad` rows of -1), its block id and how far its keys reach."""
    ids: jax.Array      # [T + pad]
    key_end: jax.Array  # [T + pad]: one past the last key position a token may attend to (kv_len aside)

    @classmethod
    def build(cls, block_ids, batch: _Batch, pad: int):
        num_tokens = block_ids.shape[0]
        t = jnp.arange(num_tokens, dtype=jnp.int32)
        ids = jnp.where(batch.token_valid, block_ids.astype(jnp.int32), -1)
        following = jnp.concatenate([ids[1:], jnp.full((1,), -1, jnp.int32)])
        last = (ids >= 0) & (following != ids)  # the last token of its block
        # A block is one contiguous run: the first last-token at or after t ends t's block.
        block_end = lax.cummin(jnp.where(last, t, num_tokens), reverse=True)
        key_end = batch.token_position + 1 + jnp.where(ids >= 0, block_end - t, 0)
        return cls(jnp.pad(ids, (0, pad), constant_values=-1), jnp.pad(key_end, (0, pad)))


@dataclasses.dataclass(frozen=True)
class _Masks:
    causal: bool
    sliding_window: int | None
    chunk_size: int | None

    def allowed(self, q_pos, k_pos, kv_len, same_block=None):
        """`same_block`: where a query and a key share a bidirectional block (lifts only the causal mask)."""
        ok = k_pos < kv_len
        if self.causal:
            ok &= k_pos <= q_pos if same_block is None else (k_pos <= q_pos) | same_block
        if self.sliding_window is not None:
            ok &= k_pos > q_pos - self.sliding_window
        if self.chunk_size is not None:
            ok &= k_pos // self.chunk_size == q_pos // self.chunk_size
        return ok

    def first_key(self, q_pos):
        """Smallest key position that query position `q_pos` may attend to."""
        first = jnp.zeros_like(q_pos)
        if self.sliding_window is not None:
            first = jnp.maximum(first, q_pos - self.sliding_window + 1)
        if self.chunk_size is not None:
            first = jnp.maximum(first, q_pos // self.chunk_size * self.chunk_size)
        return first

    def key_end(self, q_pos, kv_len):
        """One past the largest key position that `q_pos` may attend to."""
        return jnp.minimum(q_pos + 1, kv_len) if self.causal else kv_len


@dataclasses.dataclass(frozen=True)
class _Attend:
    layout: CacheLayout
    batch: _Batch
    # [T, K, H] fp32, this step's tokens, overlaid on what the cache holds; None where the
    # cache was written first and holds them already, in the same values.
    new_keys: jax.Array | None
    new_values: jax.Array | None
    page_size: int
    tiling: Tiling
    masks: _Masks
    score_scale: float       # sm_scale, times k_scale (and q_scale) of a quantized cache
    v_scale: float | None    # a quantized cache's value scale, applied to p @ v
    soft_cap: float | None
    sink: jax.Array | None
    num_heads: int
    out_dtype: jnp.dtype
    blocks: _Blocks | None = None

    def _new_tokens(self, request, k_pos):
        """Which key positions k_pos [..., s] of `request` are this step's tokens, and their token index."""
        batch = self.batch
        kv_len = batch.kv_lens[request][..., None]
        first_new = kv_len - batch.q_lens[request][..., None]
        is_new = (k_pos >= first_new) & (k_pos < kv_len)
        token = jnp.clip(batch.q_starts[request][..., None] + k_pos - first_new, 0, batch.token_request.shape[0] - 1)
        return is_new, token

    def _kv_block(self, kv_cache, request, block, num_pages, k_pos):
        """K, V [..., s, K, H] in fp32 at positions k_pos [s] (block `block` of `num_pages` pages) of
        `request`: the cache, or this step's tokens."""
        pages = self.batch.pages(request, block * num_pages, num_pages)
        rows = kv_cache[pages]                      # [..., pages, page_size, slots/p, p, width]
        rows = rows.reshape(*rows.shape[:-5], k_pos.shape[0], *rows.shape[-3:])
        k, v = self.layout.split(rows)
        if self.new_keys is None:
            return k.astype(jnp.float32), v.astype(jnp.float32)
        is_new, token = self._new_tokens(request, k_pos)
        is_new = is_new[..., None, None]
        k = jnp.where(is_new, self.new_keys[token], k.astype(jnp.float32))
        v = jnp.where(is_new, self.new_values[token], v.astype(jnp.float32))
        return k, v

    def _init_state(self, q_shape):
        """Online-softmax state (max, denominator, accumulator) for queries [..., q, K, G, H]."""
        stat_shape = q_shape[:-1]
        if self.sink is None:
            m = jnp.full(stat_shape, -jnp.inf, jnp.float32)
            l = jnp.zeros(stat_shape, jnp.float32)
        else:  # the sink is one more logit that carries no value
            kv_heads, group = q_shape[-3], q_shape[-2]
            m = jnp.broadcast_to(self.sink.astype(jnp.float32).reshape(kv_heads, group), stat_shape)
            l = jnp.ones(stat_shape, jnp.float32)
        return m, l, jnp.zeros(q_shape, jnp.float32)

    def _update(self, state, q, k, v, allowed):
        """Fold one KV block into the state. q [..., q, K, G, H]; k, v [..., s, K, H]; allowed [..., q, s]."""
        m, l, acc = state
        # One query per row (decode rows): scores and p @ v as broadcast products summed, which XLA
        # fuses into loops reading the gathered block in place. A batched dot over (row, KV head)
        # would first copy K and V into a head-major layout, every block (2-3x the decode step on CPU).
        one_query = q.shape[-4] == 1
        if one_query:
            keys = jnp.swapaxes(k, -3, -2)[..., None, :, None, :, :]    # [..., 1, K, 1, s, H]
            s = jnp.sum(q[..., None, :] * keys, axis=-1) * self.score_scale
        else:
            s = jnp.einsum("...qkgh,...skh->...qkgs", q, k, preferred_element_type=jnp.float32) * self.score_scale
        if self.soft_cap is not None:
            s = self.soft_cap * jnp.tanh(s / self.soft_cap)
        allowed = allowed[..., :, None, None, :]
        s = jnp.where(allowed, s, -jnp.inf)
        m_new = jnp.maximum(m, s.max(axis=-1))
        m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)  # a row with nothing allowed yet
        p = jnp.where(allowed, jnp.exp(s - m_safe[..., None]), 0.0)
        alpha = jnp.exp(m - m_safe)
        l = alpha * l + p.sum(axis=-1)
        if one_query:
            pv = jnp.sum(p[..., None] * jnp.swapaxes(v, -3, -2)[..., None, :, None, :, :], axis=-2)
        else:
            pv = jnp.einsum("...qkgs,...skh->...qkgh", p, v)
        if self.v_scale is not None:
            pv = pv * self.v_scale
        acc = alpha[..., None] * acc + pv
        return m_new, l, acc

    @staticmethod
    def _finish(state, dtype):
        _, l, acc = state
        return (acc / jnp.where(l == 0, 1.0, l)[..., None]).astype(dtype)

    def _attend_range(self, kv_cache, q, q_pos, request, kv_len, first_key, end_key, block_tokens, q_blocks=None):
        """Attend queries q [..., q, K, G, H] at q_pos [..., q] over the KV blocks of `block_tokens`
        that hold key positions [first_key, end_key); `q_blocks` [..., q]: the queries' bidirectional block ids."""
        num_pages = max(1, block_tokens // self.page_size)
        block_tokens = num_pages * self.page_size

        def body(block, state):
            k_pos = block * block_tokens + jnp.arange(block_tokens)
            k, v = self._kv_block(kv_cache, request, block, num_pages, k_pos)
            same_block = None
            if q_blocks is not None:
                is_new, token = self._new_tokens(request, k_pos)
                k_blocks = jnp.where(is_new, self.blocks.ids[token], -1)
                same_block = (q_blocks[..., :, None] == k_blocks[..., None, :]) & (q_blocks[..., :, None] >= 0)
            allowed = self.masks.allowed(q_pos[..., :, None], k_pos, kv_len[..., None, None], same_block)
            # Slots no query here may see hold stale data or, past a window, pages already
            # returned to the pool (vLLM's null block): maybe NaN, and 0 * NaN would leak
            # through p @ v.
            v = jnp.where(allowed.any(axis=-2)[..., None, None], v, 0.0)
            return self._update(state, q.astype(jnp.float32), k, v, allowed)
        state = lax.fori_loop(first_key // block_tokens, _cdiv(end_key, block_tokens), body,
                              self._init_state(q.shape))
        return self._finish(state, self.out_dtype)

    def decode_rows(self, q, out, kv_cache, tile: int):
        """Tokens of the decode requests, `tile` at a time, each row gathering its own pages.

        Decode requests come first, so their tokens are rows [0, cu_q_lens[decode_end]).
        """
        batch = self.batch
        num_rows = batch.decode_tokens

        def body(i, out):
            rows = i * tile + jnp.arange(tile)
            live = rows < num_rows
            rows = jnp.minimum(rows, batch.token_request.shape[0] - 1)
            request = batch.token_request[rows]
            kv_len = jnp.where(live, batch.kv_lens[request], 0)
            q_pos = batch.token_position[rows]
            first = jnp.where(live, self.masks.first_key(q_pos), jnp.iinfo(jnp.int32).max).min()
            end = jnp.where(live, self.masks.key_end(q_pos, kv_len), 0).max()
            q_tile = lax.dynamic_slice_in_dim(q, i * tile, tile)[:, None]  # [tile, 1, K, G, H]
            new = self._attend_range(kv_cache, q_tile, q_pos[:, None], request, kv_len, first, end,
                                     self.tiling.decode_kv_tokens)
            old = lax.dynamic_slice_in_dim(out, i * tile, tile)
            out = lax.dynamic_update_slice_in_dim(out, jnp.where(live[:, None, None, None], new[:, 0], old),
                                                  i * tile, 0)
            return out

        return lax.fori_loop(0, _cdiv(num_rows, tile), body, out)

    def query_blocks(self, q, out, kv_cache):
        """Prefill and mixed requests, `query_block` query tokens at a time."""
        batch, bq = self.batch, self.tiling.query_block

        def request_body(r, out):
            q_start, q_len, kv_len = batch.q_starts[r], batch.q_lens[r], batch.kv_lens[r]

            def block_body(j, out):
                offset = j * bq + jnp.arange(bq)
                live = offset < q_len
                q_pos = kv_len - q_len + offset
                last_pos = kv_len - q_len + jnp.minimum((j + 1) * bq, q_len) - 1
                first = self.masks.first_key(q_pos[0])
                end = self.masks.key_end(last_pos, kv_len)
                q_block = lax.dynamic_slice_in_dim(q, q_start + j * bq, bq)
                q_blocks = None
                if self.blocks is not None:
                    q_blocks = lax.dynamic_slice_in_dim(self.blocks.ids, q_start + j * bq, bq)
                    block_end = lax.dynamic_slice_in_dim(self.blocks.key_end, q_start + j * bq, bq)
                    end = jnp.maximum(end, jnp.minimum(jnp.where(live, block_end, 0).max(), kv_len))
                new = self._attend_range(kv_cache, q_block, q_pos, r, kv_len, first, end,
                                         self.tiling.kv_block_tokens, q_blocks)
                old = lax.dynamic_slice_in_dim(out, q_start + j * bq, bq)
                return lax.dynamic_update_slice_in_dim(
                    out, jnp.where(live[:, None, None, None], new, old), q_start + j * bq, 0)

            return lax.fori_loop(0, _cdiv(q_len, bq), block_body, out)

        return lax.fori_loop(batch.decode_end, batch.num_seqs, request_body, out)


def _cdiv(a, b):
    return (a + b - 1) // b
