"""Portable ragged paged attention (`jaxllm.attention.portable`) and its sharded dispatch, on CPU.

Every result is checked against
- a dense per-request reference written here (numpy, float64): full K/V of a
  request = the history the test itself put into the cache, then the new tokens;
  mask; softmax. It shares no paging logic with the implementation;
- tpu-inference's own references (`ref_ragged_paged_attention`, and
  `ref_ragged_paged_attention_hd64` for head_dim 64) where they apply;
and the cache after the call is compared bitwise with one the test builds from
tpu-inference's `merge_kv` rows.

All kernel calls go through `jax.jit`. Batches share shapes (token count, request
slots, page table, cache) so that each static configuration compiles once.
"""

from __future__ import annotations

import dataclasses
import functools
from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType
from tpu_inference.kernels.ragged_paged_attention.v3 import kernel as tpu_rpa
from tpu_inference.kernels.ragged_paged_attention.v3 import kernel_hd64 as tpu_rpa_hd64
from tpu_inference.layers.common.attention_metadata import AttentionMetadata

from jaxllm import platform
from jaxllm.attention import dispatch
from jaxllm.attention.chunked import virtual_batches
from jaxllm.attention.portable import CacheLayout, Tiling, ragged_paged_attention

F32 = np.dtype(np.float32)
BF16 = np.dtype(jnp.bfloat16)

# fp32: the kernel accumulates in fp32, the reference in fp64.
F32_TOL = dict(rtol=1e-5, atol=1e-5)
# bf16: inputs are bf16 and the reference sees the same bf16-rounded inputs (in
# fp64); the kernel computes scores, softmax and p@v in fp32 and rounds only the
# output to bf16. That final rounding is at most half a bf16 ulp, 2**-8 ~ 0.4%
# relative, so 1% relative (+ a small absolute term for outputs near 0) has
# margin without hiding a wrong mask or a wrong head (those are O(1) errors).
BF16_TOL = dict(rtol=1e-2, atol=2e-3)
# tpu-inference's reference itself works in bf16 for bf16 inputs (it rounds the
# scores and/or the probabilities to bf16 before p@v), so comparing against it
# needs a few bf16 ulps more.
TPU_REF_BF16_TOL = dict(rtol=3e-2, atol=3e-2)

STATIC_ARGS = ("sm_scale", "sliding_window", "chunk_size", "soft_cap", "update_kv_cache", "use_causal_mask",
               "tiling")
RPA = jax.jit(ragged_paged_attention, static_argnames=STATIC_ARGS)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def align(x: int, a: int) -> int:
    return cdiv(x, a) * a


# ---------------------------------------------------------------------------
# The cache layout, written out independently of the implementation.


def cache_row_shape(num_kv_heads: int, head_dim: int, dtype) -> tuple[int, int, int]:
    """One token's cache row: [combined slots // packing, packing, width]."""
    packing = 4 // np.dtype(dtype).itemsize
    if head_dim == 64:  # hd64: slot k = [K_k | V_k]
        slots, width = align(num_kv_heads, packing), 128
    else:  # slot 2k = K_k, slot 2k+1 = V_k, zero-padded to a multiple of 128
        slots, width = align(2 * num_kv_heads, packing), align(head_dim, 128)
    return slots // packing, packing, width


def np_cache_rows(k: np.ndarray, v: np.ndarray) -> np.ndarray:
    """[T, K, H] x2 -> cache rows [T, *cache_row_shape]."""
    t, heads, h = k.shape
    sp, p, width = cache_row_shape(heads, h, k.dtype)
    rows = np.zeros((t, sp * p, width), k.dtype)
    if h == 64:
        rows[:, :heads, :64] = k
        rows[:, :heads, 64:] = v
    else:
        rows[:, 0:2 * heads:2, :h] = k
        rows[:, 1:2 * heads:2, :h] = v
    return rows.reshape(t, sp, p, width)


MERGE_KV = jax.jit(tpu_rpa.merge_kv)
MERGE_KV_HD64 = jax.jit(tpu_rpa_hd64.merge_kv)


def tpu_cache_rows(k: np.ndarray, v: np.ndarray) -> np.ndarray:
    """The same rows as built by tpu-inference's `merge_kv`."""
    merge = MERGE_KV_HD64 if k.shape[-1] == 64 else MERGE_KV
    return np.asarray(merge(jnp.asarray(k), jnp.asarray(v)))


def bits(x) -> np.ndarray:
    x = np.asarray(x)
    return x.view(f"u{x.dtype.itemsize}")


def assert_bitwise_equal(actual, expected, msg=""):
    a, b = bits(actual), bits(expected)
    if a.shape != b.shape or not np.array_equal(a, b):  # the fast check; the slow one explains
        np.testing.assert_array_equal(a, b, err_msg=msg)


# ---------------------------------------------------------------------------
# Random ragged batches.


@dataclasses.dataclass
class Seq:
    q_len: int
    kv_len: int
    q_start: int
    pages: np.ndarray      # the request's live pages, cdiv(kv_len, page_size) of them
    hist_k: np.ndarray     # [kv_len - q_len, K, H]: what the cache held before the call
    hist_v: np.ndarray


@dataclasses.dataclass
class Case:
    q: np.ndarray          # [T, N, H]
    k: np.ndarray          # [T, K, H]
    v: np.ndarray
    cache: np.ndarray      # [num_pages, page_size, *cache_row_shape]
    kv_lens: np.ndarray
    page_indices: np.ndarray
    cu_q_lens: np.ndarray
    distribution: np.ndarray
    seqs: list[Seq]
    page_size: int

    @property
    def num_real_tokens(self) -> int:
        return sum(s.q_len for s in self.seqs)

    @property
    def head_dim(self) -> int:
        return self.q.shape[-1]

    def metadata(self):
        return tuple(jnp.asarray(a) for a in (self.kv_lens, self.page_indices, self.cu_q_lens, self.distribution))

    def args(self):
        return (jnp.asarray(self.q), jnp.asarray(self.k), jnp.asarray(self.v), jnp.asarray(self.cache),
                *self.metadata())


def make_case(seed, decode, prefill, mixed, *, heads=(4, 2, 128), dtype=F32, page_size=16,
              num_tokens=768, max_num_seqs=16, pages_per_seq=48, num_pages=640, kv_repeat=1,
              table_tail="random", cu_pad="repeat", unused_pages="random", nan_padding_tokens=False):
    """A ragged batch: decode rows (q_len 1) first, then full prefills (q_len == kv_len), then
    chunked prefills (q_len < kv_len), on randomly permuted pages.

    table_tail: what the page table holds past each request's live pages and in the padded
      request slots: "random" (any page id, live or not), "unused" (pages no live request
      owns) or "null" (one all-zero page, like vLLM's null block).
    unused_pages: contents of the pages no live request owns: "random" (finite garbage) or "nan".
    kv_repeat: K/V heads come in groups of this many identical copies (the cache of a run whose
      KV heads were replicated up to the tensor-parallel degree).
    """
    rng = np.random.default_rng(seed)            # the data: q, k, v, history
    prng = np.random.default_rng([seed, 1])      # pages, garbage and junk, so data do not depend on capacity
    num_heads, num_kv_heads, head_dim = heads
    lens = [(1, kv) for kv in decode] + [(n, n) for n in prefill] + [tuple(m) for m in mixed]
    num_seqs = len(lens)
    assert num_seqs <= max_num_seqs and sum(q for q, _ in lens) < num_tokens
    assert all(0 < q <= kv <= pages_per_seq * page_size for q, kv in lens), lens
    counts = [cdiv(kv, page_size) for _, kv in lens]
    perm = prng.permutation(num_pages).astype(np.int32)
    live, unused = perm[:sum(counts)], perm[sum(counts):]
    assert len(unused) >= 1
    null_page = unused[0]

    table = np.empty((max_num_seqs, pages_per_seq), np.int32)
    junk = {"random": lambda n: prng.integers(0, num_pages, n),
            "unused": lambda n: prng.choice(unused, n),
            "null": lambda n: np.full(n, null_page)}[table_tail]
    table[:] = junk(table.size).reshape(table.shape)
    starts = np.cumsum([0] + counts)
    for r in range(num_seqs):
        table[r, :counts[r]] = live[starts[r]:starts[r + 1]]

    row_shape = cache_row_shape(num_kv_heads, head_dim, dtype)
    shape = (num_pages, page_size, *row_shape)
    cache = (3 * prng.standard_normal(shape, np.float32)).astype(dtype)
    if unused_pages == "nan":
        cache[unused] = np.nan
    if table_tail == "null":
        cache[null_page] = 0

    def randn(*s):
        return rng.standard_normal(s, np.float32).astype(dtype)

    def kv_heads(n):
        return np.repeat(randn(n, num_kv_heads // kv_repeat, head_dim), kv_repeat, axis=1)

    q, k, v = randn(num_tokens, num_heads, head_dim), kv_heads(num_tokens), kv_heads(num_tokens)
    q_lens = [q_len for q_len, _ in lens]
    total = sum(q_lens)
    if nan_padding_tokens:
        q[total:], k[total:], v[total:] = np.nan, np.nan, np.nan

    cu_q_lens = np.zeros(max_num_seqs + 1, np.int32)
    cu_q_lens[1:num_seqs + 1] = np.cumsum(q_lens)
    cu_q_lens[num_seqs + 1:] = {"repeat": lambda n: np.full(n, total),
                                "junk": lambda n: prng.integers(0, 2 * num_tokens, n)}[cu_pad](
                                    max_num_seqs - num_seqs)
    kv_lens = prng.integers(0, 4 * pages_per_seq * page_size, max_num_seqs).astype(np.int32)  # junk past num_seqs

    seqs = []
    for r, (q_len, kv_len) in enumerate(lens):
        kv_lens[r] = kv_len
        ctx = kv_len - q_len
        hist_k, hist_v = kv_heads(ctx), kv_heads(ctx)
        pos = np.arange(ctx)
        cache[table[r, pos // page_size], pos % page_size] = np_cache_rows(hist_k, hist_v)
        seqs.append(Seq(q_len, kv_len, int(cu_q_lens[r]), table[r, :counts[r]].copy(), hist_k, hist_v))

    num_decode, num_prefill = len(decode), len(prefill)
    distribution = np.array([num_decode, num_decode + num_prefill, num_seqs], np.int32)
    return Case(q, k, v, cache, kv_lens, table.reshape(-1), cu_q_lens, distribution, seqs, page_size)


def random_specs(seed: int, page_size: int):
    """(decode kv_lens, full-prefill lens, chunked-prefill (q_len, kv_len)) for a random batch.

    Lengths hit page edges (multiples of the page size, +-1) and 256-token KV-block edges;
    seed 0 has a 300-query request over 600 keys (3 query blocks x 3 KV blocks) and more
    decode rows than one decode tile (8).
    """
    rng = np.random.default_rng(100 + seed)
    ps = page_size
    edges = sorted({ps - 1, ps, ps + 1, 2 * ps, 255, 256, 257, 511, 512, 513} - {0})
    n_decode = (10, 3, 6)[seed % 3]
    decode = [int(rng.choice(edges)) if rng.random() < 0.5 else int(rng.integers(1, 600))
              for _ in range(n_decode)]
    prefill = [[1, ps, 130], [ps + 1], [int(rng.integers(2, 150)), ps]][seed % 3]
    mixed = [[(300, 600), (ps, 2 * ps), (1, 257)],
             [(129, 513), (int(rng.integers(1, 100)), 255), (ps - 1, ps + 1)],
             [(int(rng.integers(1, 120)), int(rng.integers(200, 700))), (ps, 512), (100, 256)]][seed % 3]
    return decode, prefill, mixed


FAMILIES = {  # page size -> shapes shared by every batch of that page size
    16: dict(num_tokens=768, max_num_seqs=16, pages_per_seq=48, num_pages=640),
    8: dict(num_tokens=768, max_num_seqs=16, pages_per_seq=96, num_pages=1280),
    128: dict(num_tokens=768, max_num_seqs=16, pages_per_seq=6, num_pages=80),
}


def random_case(seed, heads=(4, 2, 128), dtype=F32, page_size=16, **kw):
    cu_pad = ("repeat", "junk", "repeat")[seed % 3]
    return make_case(seed, *random_specs(seed, page_size), heads=heads, dtype=dtype, page_size=page_size,
                     cu_pad=cu_pad, **{**FAMILIES[page_size], **kw})


# ---------------------------------------------------------------------------
# References and checks.


def dense_reference(case: Case, *, sm_scale, sliding_window=None, chunk_size=None, soft_cap=None,
                    use_causal_mask=True, attention_sink=None) -> np.ndarray:
    """[num_real_tokens, N, H] in float64, one request at a time, no paging."""
    num_heads, num_kv_heads, head_dim = case.q.shape[1], case.k.shape[1], case.head_dim
    group = num_heads // num_kv_heads
    outs = []
    for s in case.seqs:
        new = slice(s.q_start, s.q_start + s.q_len)
        # query head n uses KV head n // group: batch the matmuls over KV heads
        q = case.q[new].astype(np.float64).reshape(s.q_len, num_kv_heads, group, head_dim)
        q = np.ascontiguousarray(q.transpose(1, 2, 0, 3)).reshape(num_kv_heads, group * s.q_len, head_dim)
        k = np.concatenate([s.hist_k, case.k[new]]).astype(np.float64)                # [kv, K, H]
        v = np.concatenate([s.hist_v, case.v[new]]).astype(np.float64)
        k = np.ascontiguousarray(k.transpose(1, 2, 0))                                 # [K, H, kv]
        v = np.ascontiguousarray(v.transpose(1, 0, 2))                                 # [K, kv, H]
        scores = (q @ k).reshape(num_heads, s.q_len, s.kv_len) * sm_scale              # [N, q, kv]
        if soft_cap is not None:
            scores = soft_cap * np.tanh(scores / soft_cap)
        q_pos = (s.kv_len - s.q_len + np.arange(s.q_len))[:, None]
        k_pos = np.arange(s.kv_len)[None, :]
        allowed = np.ones((s.q_len, s.kv_len), bool)
        if use_causal_mask:
            allowed &= k_pos <= q_pos
        if sliding_window is not None:
            allowed &= k_pos > q_pos - sliding_window
        if chunk_size is not None:
            allowed &= k_pos // chunk_size == q_pos // chunk_size
        scores = np.where(allowed, scores, -np.inf)
        m = scores.max(-1, keepdims=True)
        if attention_sink is not None:  # one more logit per head, carrying no value
            sink = np.asarray(attention_sink, np.float64)[:, None, None]
            m = np.maximum(m, sink)
            e = np.exp(scores - m)
            p = e / (e.sum(-1, keepdims=True) + np.exp(sink - m))
        else:
            e = np.exp(scores - m)
            p = e / e.sum(-1, keepdims=True)
        out = p.reshape(num_kv_heads, group * s.q_len, s.kv_len) @ v                  # [K, G*q, H]
        outs.append(out.reshape(num_heads, s.q_len, head_dim).transpose(1, 0, 2))
    return np.concatenate(outs)


def expected_cache(case: Case) -> np.ndarray:
    """The input cache with each live new token's `merge_kv` row put at its page slot."""
    cache = case.cache.copy()
    rows = tpu_cache_rows(case.k, case.v)
    for s in case.seqs:
        pos = np.arange(s.kv_len - s.q_len, s.kv_len)
        cache[s.pages[pos // case.page_size], pos % case.page_size] = rows[s.q_start:s.q_start + s.q_len]
    return cache


def touched_pages(case: Case) -> set[int]:
    return {int(s.pages[p // case.page_size]) for s in case.seqs for p in range(s.kv_len - s.q_len, s.kv_len)}


def tol(dtype):
    return F32_TOL if np.dtype(dtype) == F32 else BF16_TOL


def run(case: Case, attention_sink=None, **opts):
    opts.setdefault("sm_scale", case.head_dim ** -0.5)
    sink = None if attention_sink is None else jnp.asarray(attention_sink, jnp.float32)
    out, cache = RPA(*case.args(), sink, **opts)
    return np.asarray(out), np.asarray(cache)


def check(case: Case, attention_sink=None, **opts):
    """Run jitted; outputs of real tokens match the dense reference; the cache is updated exactly."""
    out, cache = run(case, attention_sink, **opts)
    opts.setdefault("sm_scale", case.head_dim ** -0.5)
    ref_opts = {k: v for k, v in opts.items() if k != "update_kv_cache"}
    n = case.num_real_tokens
    assert out.shape == case.q.shape and out.dtype == case.q.dtype
    np.testing.assert_allclose(out[:n].astype(np.float64),
                               dense_reference(case, attention_sink=attention_sink, **ref_opts),
                               **tol(case.q.dtype))
    if opts.get("update_kv_cache", True):
        assert_cache_updated_exactly(case, cache)
    return out, cache


def assert_cache_updated_exactly(case: Case, cache: np.ndarray):
    assert cache.shape == case.cache.shape and cache.dtype == case.cache.dtype
    untouched = sorted(set(range(case.cache.shape[0])) - touched_pages(case))
    assert_bitwise_equal(cache[untouched], case.cache[untouched], "a page no new token belongs to changed")
    assert_bitwise_equal(cache, expected_cache(case), "cache rows of the new tokens are not exactly merge_kv's")


# ---------------------------------------------------------------------------
# Layout.


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["f32", "bf16"])
@pytest.mark.parametrize("num_kv_heads,head_dim", [(1, 128), (2, 128), (3, 64), (2, 64), (2, 32), (1, 96)])
def test_cache_layout_is_tpu_inferences(num_kv_heads, head_dim, dtype):
    rng = np.random.default_rng(0)
    k = rng.standard_normal((5, num_kv_heads, head_dim), np.float32).astype(dtype)
    v = rng.standard_normal((5, num_kv_heads, head_dim), np.float32).astype(dtype)
    shape_fn = tpu_rpa_hd64.get_kv_cache_shape if head_dim == 64 else tpu_rpa.get_kv_cache_shape
    layout = CacheLayout(num_kv_heads, head_dim, 4 // dtype.itemsize)
    assert layout.cache_shape(7, 16) == shape_fn(7, 16, num_kv_heads, head_dim, dtype)
    assert (7, 16, *cache_row_shape(num_kv_heads, head_dim, dtype)) == layout.cache_shape(7, 16)
    rows = tpu_cache_rows(k, v)
    assert_bitwise_equal(np_cache_rows(k, v), rows)
    assert_bitwise_equal(jax.jit(layout.merge)(k, v), rows)
    split_k, split_v = jax.jit(layout.split)(rows)
    assert_bitwise_equal(split_k, k)
    assert_bitwise_equal(split_v, v)


# ---------------------------------------------------------------------------
# Ragged batches against the dense reference.

MAIN_CONFIGS = [  # (N, K, H), dtype, page size
    ((4, 2, 128), F32, 16),
    ((8, 1, 128), F32, 16),
    ((4, 2, 64), F32, 16),
    ((8, 1, 64), F32, 16),
    ((4, 2, 32), F32, 16),
    ((4, 2, 128), BF16, 16),
    ((8, 1, 64), BF16, 16),
    ((4, 2, 32), BF16, 16),
    ((4, 2, 128), F32, 128),
    ((8, 1, 128), BF16, 8),
]


def config_id(heads, dtype, page_size):
    n, k, h = heads
    return f"N{n}K{k}H{h}-{'f32' if dtype == F32 else 'bf16'}-ps{page_size}"


MAIN_PARAMS = [pytest.param(*config, seed, id=f"{config_id(*config)}-seed{seed}")
               for i, config in enumerate(MAIN_CONFIGS)
               for seed in ((0, 1, 2) if i < 5 else (0, 1))]  # fewer seeds for the bf16 / page-size variants


@pytest.mark.parametrize("heads,dtype,page_size,seed", MAIN_PARAMS)
def test_ragged_batch_matches_dense_reference_and_writes_cache_exactly(heads, dtype, page_size, seed):
    check(random_case(seed, heads, dtype, page_size))


# sliding window, soft cap, no causal mask; one compile each.
MASK_CASES = {
    "window1": ((4, 2, 128), F32, dict(sliding_window=1)),
    "window37": ((4, 2, 128), F32, dict(sliding_window=37)),
    "window256": ((4, 2, 128), F32, dict(sliding_window=256)),
    # sm_scale 1: raw scores ~ N(0, 128), so the cap really squashes them.
    "softcap": ((4, 2, 128), F32, dict(soft_cap=5.0, sm_scale=1.0)),
    "noncausal": ((4, 2, 128), F32, dict(use_causal_mask=False)),
    "window37_softcap_hd64": ((4, 2, 64), F32, dict(sliding_window=37, soft_cap=5.0, sm_scale=1.0)),
}


@pytest.mark.parametrize("name", MASK_CASES)
def test_masks_and_soft_cap_match_dense_reference(name):
    heads, dtype, opts = MASK_CASES[name]
    check(random_case(0, heads, dtype), **opts)


# Sequences crossing several chunks, decode rows at the first / last position of a
# chunk, and queries that straddle a chunk edge.
CHUNK_SPECS = ([65, 600, 128, 129, 257], [200], [(300, 600), (10, 70), (100, 250)])


@pytest.mark.parametrize("chunk_size", [64, 100, 256])  # page-aligned, aligned to nothing, KV-block-aligned
def test_chunked_local_mask_matches_dense_reference(chunk_size):
    check(make_case(3, *CHUNK_SPECS, **FAMILIES[16]), chunk_size=chunk_size)


@pytest.mark.parametrize("chunk_size", [64, 256])
def test_virtual_batches_equal_the_chunk_mask(chunk_size):
    """Causal attention over per-chunk virtual requests (how chunked layers run on TPU) gives
    what the chunk mask gives: the same outputs and bitwise the same cache."""
    case = make_case(3, *CHUNK_SPECS, **FAMILIES[16])
    expected_out, expected_cache = check(case, chunk_size=chunk_size)
    q, k, v, cache, *requests = case.args()
    split = jax.jit(functools.partial(virtual_batches, chunk_size=chunk_size, page_size=case.page_size,
                                      num_tokens=q.shape[0]))
    virtual = split(*requests)
    # One piece per chunk each request's queries touch; decodes stay first.
    pieces = [cdiv(s.kv_len, chunk_size) - (s.kv_len - s.q_len) // chunk_size for s in case.seqs]
    assert int(virtual[3][2]) == sum(pieces) > len(case.seqs)
    assert int(virtual[3][0]) == int(case.distribution[0])
    out, new_cache = RPA(q, k, v, cache, *virtual, sm_scale=case.head_dim ** -0.5)
    n = case.num_real_tokens
    np.testing.assert_allclose(np.asarray(out)[:n], expected_out[:n], rtol=1e-6, atol=1e-6)
    assert_bitwise_equal(new_cache, expected_cache)
    with pytest.raises(ValueError, match="not a multiple of the KV-cache page size"):
        virtual_batches(*requests, chunk_size=100, page_size=case.page_size, num_tokens=q.shape[0])


def test_tpu_dispatch_runs_chunked_layers_as_virtual_batches(monkeypatch):
    """dispatch's TPU branch, on the CPU: tpu-inference's sharded RPA (with our kernel in place of
    the Pallas one, as the plugin installs off TPU) over virtual requests == the chunk mask."""
    import jaxllm.vllm_plugin as plugin

    plugin.register()
    mesh = jax.make_mesh((1, 2), ("data", "model"), axis_types=(AxisType.Auto, AxisType.Auto),
                         devices=jax.devices()[:2])  # the case's 2 KV heads, one per device
    case = make_case(3, *CHUNK_SPECS, **FAMILIES[16])
    expected_out, expected_cache = check(case, chunk_size=64)
    kv_lens, page_indices, cu_q_lens, distribution = case.metadata()
    md = AttentionMetadata(input_positions=jnp.zeros(case.q.shape[0], jnp.int32), block_tables=page_indices,
                           seq_lens=kv_lens, query_start_loc=cu_q_lens, request_distribution=distribution)
    monkeypatch.setattr(platform, "on_tpu", lambda: True)

    @jax.jit
    def layer(q, k, v, cache, md):
        return dispatch.attention(q, k, v, cache, md, mesh, sm_scale=case.head_dim ** -0.5, chunk_size=64)

    out, new_cache = layer(jnp.asarray(case.q), jnp.asarray(case.k), jnp.asarray(case.v), jnp.asarray(case.cache), md)
    n = case.num_real_tokens
    np.testing.assert_allclose(np.asarray(out)[:n], expected_out[:n], rtol=1e-6, atol=1e-6)
    assert_bitwise_equal(new_cache, expected_cache)


def sink_logits(num_heads):
    """Sink logits per head: around the scores' range, one head where the sink takes most of the mass."""
    sink = np.random.default_rng(7).normal(0.0, 2.0, num_heads).astype(np.float32)
    sink[0] = 6.0
    return sink


# (hd64 with a sink is also checked against tpu-inference's reference further down.)
@pytest.mark.parametrize("heads,dtype,opts", [
    ((4, 2, 128), F32, {}),
    ((8, 1, 64), BF16, dict(sliding_window=37)),
], ids=["hd128-f32", "hd64-bf16-window37"])
def test_attention_sink_matches_dense_reference(heads, dtype, opts):
    check(random_case(0, heads, dtype), attention_sink=sink_logits(heads[0]), **opts)


def test_update_kv_cache_false_gives_same_output_and_leaves_cache_bitwise_unchanged():
    case = random_case(0, (8, 1, 64), BF16)
    out_true, _ = run(case)
    out_false, cache = check(case, update_kv_cache=False)
    assert_bitwise_equal(out_false, out_true)
    assert_bitwise_equal(cache, case.cache)


# ---------------------------------------------------------------------------
# Against tpu-inference's references. They loop over requests in Python, so they
# are jitted with the request metadata closed over as constants (one compile per
# case). The request lengths differ from the tests above, the shapes do not, so
# most cases reuse a kernel compile; `check` also compares with the dense reference.

REF_SPECS = ([17, 600], [33], [(300, 600), (5, 256)])
REF_CASES = {
    "hd128-f32-window37": ((4, 2, 128), F32, dict(sliding_window=37)),
    "hd128-f32-noncausal": ((4, 2, 128), F32, dict(use_causal_mask=False)),
    "hd128-bf16": ((4, 2, 128), BF16, {}),
    "hd32-f32": ((4, 2, 32), F32, {}),
    "hd64-f32-window37-softcap": ((4, 2, 64), F32, dict(sliding_window=37, soft_cap=5.0, sm_scale=1.0)),
    "hd64-f32-sink": ((4, 2, 64), F32, dict(sink=True)),
    "hd64-bf16-sink-window37": ((8, 1, 64), BF16, dict(sink=True, sliding_window=37)),
}


def tpu_reference(case: Case, attention_sink, **opts):
    metadata = (case.kv_lens, case.page_indices, case.cu_q_lens, case.distribution)  # numpy: static
    if case.head_dim == 64:
        def ref(q, k, v, cache, sink):
            return tpu_rpa_hd64.ref_ragged_paged_attention_hd64(q, k, v, cache, *metadata, sink, **opts)
    else:
        assert attention_sink is None

        def ref(q, k, v, cache, sink):
            return tpu_rpa.ref_ragged_paged_attention(q, k, v, cache, *metadata, **opts)
    q, k, v, cache, *_ = case.args()
    sink = None if attention_sink is None else jnp.asarray(attention_sink)
    out, cache = jax.jit(ref)(q, k, v, cache, sink)
    return np.asarray(out), np.asarray(cache)


@pytest.mark.parametrize("name", REF_CASES)
def test_matches_tpu_inference_reference(name):
    heads, dtype, opts = REF_CASES[name]
    opts = dict(opts)
    case = make_case(4, *REF_SPECS, heads=heads, dtype=dtype, **FAMILIES[16])
    sink = sink_logits(heads[0]) if opts.pop("sink", False) else None
    opts.setdefault("sm_scale", case.head_dim ** -0.5)
    out, cache = check(case, attention_sink=sink, **opts)
    ref_out, ref_cache = tpu_reference(case, sink, **opts)
    n = case.num_real_tokens
    assert ref_out.shape == (n, *case.q.shape[1:])
    np.testing.assert_allclose(out[:n].astype(np.float32), ref_out.astype(np.float32),
                               **(F32_TOL if dtype == F32 else TPU_REF_BF16_TOL))
    assert_bitwise_equal(cache, ref_cache)


# ---------------------------------------------------------------------------
# Cost follows the tokens attended, not the capacity.


@pytest.mark.parametrize("table_tail", ["null", "unused"])
def test_pages_outside_live_requests_are_never_read(table_tail):
    """Every page no live request owns is NaN (and so is every padding token); outputs stay finite.

    table_tail="null": page-table entries past a request's pages (and padded request
    slots) point at one zero page, like vLLM's null block; NaN pages are then
    referenced by nothing, so any NaN in the output means a read of an unrelated page.
    table_tail="unused": those entries point at the NaN pages themselves, so this also
    asserts that no page past a request's first cdiv(kv_len, page_size) contributes to
    its output, not even one inside the last 256-token KV block that is gathered whole
    (0 * NaN in p@v would poison the row).
    """
    case = random_case(0, table_tail=table_tail, unused_pages="nan", nan_padding_tokens=True)
    out, _ = run(case)
    n = case.num_real_tokens
    nan_rows = np.isnan(out[:n].astype(np.float32)).any(axis=(1, 2))
    assert not nan_rows.any(), (f"{nan_rows.sum()} of {n} real token rows are NaN: a page no live "
                                f"request owns reached the output (first bad token {nan_rows.argmax()})")
    check(case)


def test_a_decode_row_alone_and_in_a_full_tile_agree():
    """Few decode rows go one at a time, more in tiles of 8 (`Tiling.few_decode_rows`). A row alone
    and among 8 others, and a whole batch in tiles of one or of 8, agree to float rounding: the last
    bits may differ, as they do between batched matmuls of different sizes elsewhere in the model."""
    case = make_case(4, [300, 17, 600, 256, 33, 129, 64, 511, 90], [], [], **FAMILIES[16])
    q, k, v, cache, kv_lens, page_indices, cu_q_lens, distribution = case.args()
    out_batch, _ = RPA(q, k, v, cache, kv_lens, page_indices, cu_q_lens, distribution, sm_scale=0.1)
    alone = jnp.asarray([1, 1, 1], jnp.int32)
    out_alone, _ = RPA(q, k, v, cache, kv_lens, page_indices, jnp.minimum(cu_q_lens, 1), alone, sm_scale=0.1)
    np.testing.assert_allclose(np.asarray(out_alone)[0], np.asarray(out_batch)[0], rtol=1e-6, atol=1e-7)
    one_at_a_time, _ = RPA(q, k, v, cache, kv_lens, page_indices, cu_q_lens, distribution, sm_scale=0.1,
                           tiling=Tiling(few_decode_rows=100))
    n = case.num_real_tokens
    np.testing.assert_allclose(np.asarray(one_at_a_time)[:n], np.asarray(out_batch)[:n], rtol=1e-6, atol=1e-7)
    with pytest.raises(TypeError, match="num_kv_pages_per_block"):  # no knob is silently accepted
        RPA(q, k, v, cache, kv_lens, page_indices, cu_q_lens, distribution, num_kv_pages_per_block=4)


def test_results_do_not_depend_on_page_table_or_cache_capacity():
    """The same requests with 48 pages per request and 640 pages, or 512 and 2048: bitwise the same output."""
    small = make_case(5, *random_specs(0, 16), heads=(8, 1, 128), **FAMILIES[16])
    huge = make_case(5, *random_specs(0, 16), heads=(8, 1, 128), num_tokens=768, max_num_seqs=16,
                     pages_per_seq=512, num_pages=2048)
    for name in ("q", "k", "v"):
        assert_bitwise_equal(getattr(small, name), getattr(huge, name))
    out_small, _ = check(small)
    out_huge, _ = check(huge)
    n = small.num_real_tokens
    assert_bitwise_equal(out_huge[:n], out_small[:n])


def _sub_jaxprs(params):
    for value in params.values():
        for item in value if isinstance(value, (tuple, list)) else [value]:
            if hasattr(item, "eqns"):                              # Jaxpr
                yield item
            elif hasattr(item, "jaxpr") and hasattr(item, "consts"):  # ClosedJaxpr
                yield item.jaxpr


def _all_shapes(jaxpr) -> list[tuple]:
    shapes = []
    for eqn in jaxpr.eqns:
        shapes += [tuple(v.aval.shape) for v in eqn.outvars if hasattr(v.aval, "shape")]
        for sub in _sub_jaxprs(eqn.params):
            shapes += _all_shapes(sub)
    return shapes


def test_no_traced_array_scales_with_pages_per_seq():
    """Tracing with 40 or 4000 pages per request gives the same intermediate shapes (bar the
    page table itself), and the request loops are while loops with data-dependent trip counts."""
    def shapes(pages_per_seq):
        case = make_case(6, [17, 300], [40], [(100, 500)], heads=(4, 2, 128), num_tokens=256,
                         max_num_seqs=4, pages_per_seq=pages_per_seq, num_pages=256)
        fn = functools.partial(ragged_paged_attention, sm_scale=0.1)
        jaxpr = jax.make_jaxpr(fn)(*case.args()).jaxpr
        table = (4 * pages_per_seq,)
        return sorted(str(("TABLE",) if s == table else s) for s in _all_shapes(jaxpr)), str(jaxpr)

    small, small_text = shapes(40)   # a table of 160 entries: a length no other array has
    large, _ = shapes(4000)
    assert small == large, (Counter(small) - Counter(large), Counter(large) - Counter(small))
    assert "while[" in small_text


# ---------------------------------------------------------------------------
# Sharded dispatch on 4 simulated devices.


SHARD_SPECS = ([17, 600, 256], [33], [(150, 300), (5, 257)])


@pytest.mark.parametrize("heads,dtype,kv_repeat", [
    ((8, 4, 128), F32, 1),
    ((8, 4, 128), BF16, 1),
    ((8, 4, 64), F32, 1),
    ((8, 4, 128), F32, 2),
], ids=["N8K4-f32", "N8K4-bf16", "N8K4-hd64-f32", "N8K2-replicated-to-4-f32"])
def test_sharded_dispatch_matches_single_device(heads, dtype, kv_repeat):
    """dispatch.attention on a (1, 4) mesh == unsharded ragged_paged_attention.

    kv_repeat=2: the model has 2 KV heads; the cache is sized for 4 (as tpu-inference's
    runner pads KV heads to the TP size) and dispatch repeats k/v up to 4 heads.
    """
    assert len(jax.devices()) == 4, "tests/conftest.py must force 4 host devices before jax starts"
    # Auto axes, like the meshes tpu-inference (and our host adaptation) build; jax.make_mesh
    # would default to Explicit axes, under which shard_map wants pre-sharded inputs.
    mesh = jax.make_mesh((1, 4), ("data", "model"), axis_types=(AxisType.Auto, AxisType.Auto))
    case = make_case(8, *SHARD_SPECS, heads=heads, dtype=dtype, kv_repeat=kv_repeat, num_tokens=512,
                     max_num_seqs=8, pages_per_seq=48, num_pages=160)
    sm_scale = case.head_dim ** -0.5
    expected_out, expected_new_cache = check(case)  # the single-device result, itself checked

    positions = np.zeros(case.q.shape[0], np.int32)
    for s in case.seqs:
        positions[s.q_start:s.q_start + s.q_len] = np.arange(s.kv_len - s.q_len, s.kv_len)
    kv_lens, page_indices, cu_q_lens, distribution = case.metadata()
    md = AttentionMetadata(input_positions=jnp.asarray(positions), block_tables=page_indices,
                           seq_lens=kv_lens, query_start_loc=cu_q_lens, request_distribution=distribution)
    k, v = case.k[:, ::kv_repeat], case.v[:, ::kv_repeat]  # the model's own KV heads

    @jax.jit
    def sharded(q, k, v, cache, md):
        return dispatch.attention(q, k, v, cache, md, mesh, sm_scale=sm_scale)

    out, new_cache = sharded(jnp.asarray(case.q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(case.cache), md)
    assert len(out.sharding.device_set) == 4
    n = case.num_real_tokens
    np.testing.assert_allclose(np.asarray(out)[:n].astype(np.float32), expected_out[:n].astype(np.float32),
                               rtol=1e-6, atol=1e-6)
    assert_bitwise_equal(new_cache, expected_new_cache)


def test_dispatch_views_a_cache_stored_in_another_layers_layout():
    """The window-aware cache stores layers of different row layouts (Gemma 4's sliding and
    global layers) in one buffer, in one layer's layout. Here the buffer is stored as pages
    of half as many tokens of rows twice as wide: dispatch views it in this layer's rows,
    gives the same output and cache bytes, and writes in place (no copy of the buffer)."""
    mesh = jax.make_mesh((1, 1), ("data", "model"), axis_types=(AxisType.Auto, AxisType.Auto),
                         devices=jax.devices()[:1])
    case = make_case(8, *SHARD_SPECS, heads=(8, 4, 128), dtype=F32, num_tokens=512, max_num_seqs=8,
                     pages_per_seq=48, num_pages=160)
    expected_out, expected_new_cache = check(case)
    num_pages, page_size, rows, packing, width = case.cache.shape
    stored_shape = (num_pages, page_size // 2, 2 * rows, packing, width)
    kv_lens, page_indices, cu_q_lens, distribution = case.metadata()
    md = AttentionMetadata(input_positions=jnp.zeros(case.q.shape[0], jnp.int32), block_tables=page_indices,
                           seq_lens=kv_lens, query_start_loc=cu_q_lens, request_distribution=distribution)

    def layer(cache, q, k, v, md):
        return dispatch.attention(q, k, v, cache, md, mesh, sm_scale=case.head_dim ** -0.5)

    step = jax.jit(layer, donate_argnums=0)
    stored = jnp.asarray(case.cache.reshape(stored_shape))
    with jax.set_mesh(mesh):
        compiled = step.lower(stored, case.q, case.k, case.v, md).compile()
        pointer = stored.unsafe_buffer_pointer()
        out, new_cache = compiled(stored, jnp.asarray(case.q), jnp.asarray(case.k), jnp.asarray(case.v), md)
    assert new_cache.shape == stored_shape and new_cache.unsafe_buffer_pointer() == pointer
    buffer_hlo_shape = "f32[" + ",".join(map(str, stored_shape)) + "]"
    view_hlo_shape = "f32[" + ",".join(map(str, case.cache.shape)) + "]"
    copies = [line for line in compiled.as_text().splitlines() if " copy(" in line
              and (buffer_hlo_shape in line.split("=")[0] or view_hlo_shape in line.split("=")[0])]
    assert copies == [], copies
    n = case.num_real_tokens
    np.testing.assert_array_equal(np.asarray(out)[:n], expected_out[:n])
    assert_bitwise_equal(np.asarray(new_cache).reshape(case.cache.shape), expected_new_cache)


# ---------------------------------------------------------------------------
# Quantized (fp8) caches: `--kv-cache-dtype fp8 | fp8_e4m3 | fp8_e5m2`.

E4M3 = np.dtype(jnp.float8_e4m3fn)
E5M2 = np.dtype(jnp.float8_e5m2)
QUANTIZED_STATIC = STATIC_ARGS + ("q_scale", "k_scale", "v_scale")
RPA_QUANTIZED = jax.jit(ragged_paged_attention, static_argnames=QUANTIZED_STATIC)


def quantized_case(seed, heads, dtype, q_dtype=F32, **kw):
    """A batch whose cache, history and new K/V are fp8 values (what quantize_kv stores); fp32 or bf16 queries."""
    case = make_case(seed, *REF_SPECS, heads=heads, dtype=dtype, **{**FAMILIES[16], **kw})
    case.q = np.random.default_rng([seed, 2]).standard_normal(case.q.shape, np.float32).astype(q_dtype)
    return case


def dequantized(case: Case, k_scale: float, v_scale: float) -> Case:
    """The same batch with the real K/V the fp8 values stand for (stored value x scale), in float64."""
    seqs = [dataclasses.replace(s, hist_k=s.hist_k.astype(np.float64) * k_scale,
                                hist_v=s.hist_v.astype(np.float64) * v_scale) for s in case.seqs]
    return dataclasses.replace(case, k=case.k.astype(np.float64) * k_scale, v=case.v.astype(np.float64) * v_scale,
                               seqs=seqs)


# Scales that are powers of two keep the dequantized reference exact, so the fp32 tolerance holds:
# the portable attention reads fp8 exactly and differs from the float64 reference only by fp32
# rounding. A scale applied twice, or not at all, moves scores or outputs by 2x, far outside it.
@pytest.mark.parametrize("dtype", [E4M3, E5M2], ids=["e4m3", "e5m2"])
@pytest.mark.parametrize("heads,opts", [
    ((4, 2, 128), dict(k_scale=0.5, v_scale=4.0)),
    ((8, 1, 64), dict(k_scale=2.0, v_scale=0.25, sliding_window=37)),
    ((4, 2, 32), dict(k_scale=1.0, v_scale=1.0, soft_cap=5.0, sm_scale=1.0)),
], ids=["hd128", "hd64-window37", "hd32-softcap"])
def test_quantized_cache_matches_dense_reference_on_dequantized_values(dtype, heads, opts):
    case = quantized_case(10, heads, dtype)
    opts = {"sm_scale": case.head_dim ** -0.5, **opts}
    out, cache = RPA_QUANTIZED(*case.args(), **opts)
    out, cache = np.asarray(out), np.asarray(cache)
    assert out.dtype == F32 and cache.dtype == dtype
    ref_opts = {k: v for k, v in opts.items() if k not in ("k_scale", "v_scale")}
    n = case.num_real_tokens
    np.testing.assert_allclose(out[:n], dense_reference(dequantized(case, opts["k_scale"], opts["v_scale"]),
                                                        **ref_opts), **F32_TOL)
    assert_cache_updated_exactly(case, cache)  # the fp8 rows themselves, as merge_kv packs 4 per 32 bits


def test_dispatch_quantizes_keys_and_values_into_an_fp8_cache():
    """Unquantized K/V and an fp8 cache: dispatch stores k / k_scale, v / v_scale as fp8 (tpu-inference's
    quantize_kv) and the attention reads them back scaled: exactly the portable attention given the
    quantized K/V, and within fp8 rounding of the unquantized attention. e4m3 keeps each value within
    2**-4 of itself (half an ulp of 3 mantissa bits), so an output, an average of V, moves by at most
    2**-4 max|v| ~ 0.27 from V's rounding (max |v| 4.4 here), a little more with K's; measured 0.12 at
    most, 0.001 on average. A scale left out on read moves outputs by up to 1.8 (K) or 3.1 (V), 0.2 on
    average: the bounds are max 0.3 and mean 0.01."""
    from tpu_inference.layers.common.quantization import quantize_kv

    mesh = jax.make_mesh((1, 1), ("data", "model"), axis_types=(AxisType.Auto, AxisType.Auto),
                         devices=jax.devices()[:1])
    case = quantized_case(12, (4, 2, 128), E4M3)
    k = np.random.default_rng(3).standard_normal(case.k.shape, np.float32)
    v = np.random.default_rng(4).standard_normal(case.v.shape, np.float32)
    kv_lens, page_indices, cu_q_lens, distribution = case.metadata()
    md = AttentionMetadata(input_positions=jnp.zeros(case.q.shape[0], jnp.int32), block_tables=page_indices,
                           seq_lens=kv_lens, query_start_loc=cu_q_lens, request_distribution=distribution)
    sm_scale, k_scale, v_scale = case.head_dim ** -0.5, 4.0, 0.5

    @jax.jit
    def layer(q, k, v, cache, md):
        return dispatch.attention(q, k, v, cache, md, mesh, sm_scale=sm_scale, k_scale=k_scale, v_scale=v_scale)

    out, cache = layer(jnp.asarray(case.q), k, v, jnp.asarray(case.cache), md)
    qk, qv = quantize_kv(E4M3, jnp.asarray(k), jnp.asarray(v), k_scale, v_scale)
    expected, expected_cache = RPA_QUANTIZED(jnp.asarray(case.q), qk, qv, jnp.asarray(case.cache), *case.metadata(),
                                             sm_scale=sm_scale, k_scale=k_scale, v_scale=v_scale)
    n = case.num_real_tokens
    np.testing.assert_array_equal(np.asarray(out)[:n], np.asarray(expected)[:n])
    assert_bitwise_equal(cache, expected_cache)
    unquantized = dataclasses.replace(dequantized(case, k_scale, v_scale), k=k, v=v)
    error = np.abs(np.asarray(out)[:n] - dense_reference(unquantized, sm_scale=sm_scale))
    assert error.max() <= 0.3 and error.mean() <= 0.01, (error.max(), error.mean())


# ---------------------------------------------------------------------------
# Argument checks.


def test_rejects_inconsistent_arguments():
    case = make_case(9, [5], [], [], num_tokens=16, max_num_seqs=2, pages_per_seq=4, num_pages=8)
    q, k, v, cache, *md = case.args()
    with pytest.raises(ValueError, match="kv_cache shape"):
        RPA(q, k[:, :1], v[:, :1], cache, *md)
    with pytest.raises(ValueError, match="dtype"):
        RPA(q, k.astype(jnp.bfloat16), v.astype(jnp.bfloat16), cache, *md)
    with pytest.raises(ValueError, match="multiple"):
        RPA(q[:, :3], k, v, cache, *md)
    with pytest.raises(ValueError, match="sliding_window"):
        RPA(q, k, v, cache, *md, sliding_window=0)
    with pytest.raises(ValueError, match="chunk_size"):
        RPA(q, k, v, cache, *md, chunk_size=0)
    with pytest.raises(ValueError, match="floating-point"):  # the kernel has no integer caches either
        i8 = jnp.zeros(CacheLayout(2, 128, 4).cache_shape(*cache.shape[:2]), jnp.int8)
        RPA(q, k.astype(jnp.int8), v.astype(jnp.int8), i8, *md)


def test_a_request_reads_pages_another_request_writes_in_the_same_step():
    """vLLM's prefix cache hands out a block as soon as a scheduled step will fill it, so a request
    with the same prefix can run in the same step as the request computing that prefix, reading
    its pages. Request B's first 32 tokens are request A's first two pages, written by A now."""
    rng = np.random.default_rng(0)
    heads, page_size, num_pages = (4, 2, 128), 16, 16
    a_len, shared, b_new = 40, 32, 8
    q = rng.standard_normal((64, heads[0], heads[2]), np.float32)
    k = rng.standard_normal((64, heads[1], heads[2]), np.float32)
    v = rng.standard_normal((64, heads[1], heads[2]), np.float32)
    layout = CacheLayout(heads[1], heads[2], 1)
    cache = rng.standard_normal(layout.cache_shape(num_pages, page_size)).astype(np.float32)  # stale garbage
    tables = np.zeros((4, 4), np.int32)
    tables[0, :3] = [5, 9, 2]        # A: 40 tokens over three pages
    tables[1, :3] = [5, 9, 11]       # B: A's first two pages, then its own
    kv_lens = np.array([a_len, shared + b_new, 0, 0], np.int32)
    cu = np.array([0, a_len, a_len + b_new, a_len + b_new, a_len + b_new], np.int32)
    distribution = np.array([0, 0, 2], np.int32)
    out, new_cache = RPA(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(cache), jnp.asarray(kv_lens),
                         jnp.asarray(tables.reshape(-1)), jnp.asarray(cu), jnp.asarray(distribution), sm_scale=0.1)

    # B attends causally to A's tokens 0..31 (this step's K/V) and to its own 8 new tokens.
    keys = np.concatenate([k[:shared], k[a_len:a_len + b_new]])
    values = np.concatenate([v[:shared], v[a_len:a_len + b_new]])
    group = heads[0] // heads[1]
    kk, vv = np.repeat(keys, group, axis=1), np.repeat(values, group, axis=1)
    qb = q[a_len:a_len + b_new]
    scores = np.einsum("qnh,knh->nqk", qb, kk) * 0.1
    positions = shared + np.arange(b_new)
    scores = np.where(np.arange(shared + b_new)[None, None, :] <= positions[None, :, None], scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    expected = np.einsum("nqk,knh->qnh", probs / probs.sum(-1, keepdims=True), vv)
    np.testing.assert_allclose(np.asarray(out)[a_len:a_len + b_new], expected, rtol=1e-5, atol=1e-5)
