"""Gemma 4's bidirectional vision blocks in the portable attention (`block_ids`), against a dense mask.

With `use_bidirectional_attention="vision"`, transformers masks Gemma 4's sliding layers as
AND(sliding_window, OR(causal, same vision block)): each run of image soft tokens also sees
the rest of its run ahead. Here a ragged batch (decodes, prefills, chunked prefills, on
shuffled pages) gets runs of block ids in its new tokens: at a request's first and last new
token, one token long, longer than the window, and crossing the portable attention's query
blocks (128) and KV blocks (256), so a query block's keys must reach past its causal end by
more than one KV block. Outputs are compared with a dense float64 reference that builds that
mask per request, and the cache with the exact `merge_kv` rows.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tpu_inference.kernels.ragged_paged_attention.v3 import kernel as tpu_rpa

from jaxllm.attention import bidirectional
from jaxllm.attention.bidirectional import run_ids
from jaxllm.attention.portable import ragged_paged_attention
from test_attention import BF16, F32, F32_TOL, RPA, assert_bitwise_equal, assert_cache_updated_exactly, \
    expected_cache, make_case, tol
from test_tpu_kernel_interpret import assert_matches_portable, runner_case, tpu_branch  # noqa: F401 (a fixture)
from test_tpu_kernel_interpret import slow as interpret_slow

# (decodes' kv_len, full prefills, chunked prefills (q_len, kv_len)), on pages of 16
SPECS = ([33, 300, 17], [300, 40], [(420, 700), (20, 90), (5, 300)])
SHAPES = dict(num_tokens=1024, max_num_seqs=8, pages_per_seq=48, num_pages=256)
# Runs of one block, (request, first new token, length), request numbers as in SPECS (decodes first).
RUNS = [
    (0, 0, 1),        # a decode row with a block id: one token, nothing ahead
    (3, 0, 290),      # a prefill's first 290 tokens: query blocks 0-2 reach keys up to 290
    (4, 10, 30),      # inside a short prefill, ending before its last token
    (5, 0, 1),        # a one-token run at the start of a chunked prefill
    (5, 3, 300),      # crosses query blocks of 128 and KV blocks of 256 (positions 283..582)
    (5, 310, 110),    # ends at the request's last token
    (6, 0, 20),       # a whole chunked prefill
    (7, 1, 2),        # right after the request's first token,
    (7, 3, 2),        # and another block right after it, to the batch's last token
]


def block_ids(case, runs=RUNS) -> np.ndarray:
    """[T] ids: each run's id is its first token's index in the packed batch (as the model builds them)."""
    ids = np.full(case.q.shape[0], -1, np.int32)
    for r, start, length in runs:
        seq = case.seqs[r]
        assert start + length <= seq.q_len
        first = seq.q_start + start
        ids[first:first + length] = first
    return ids


def dense_reference(case, ids, *, sm_scale, sliding_window=None, use_causal_mask=True) -> np.ndarray:
    """[real tokens, N, H] float64: softmax over allowed keys, per request, no paging.

    allowed = k < kv_len & k > q - window & (k <= q | q, k new tokens of one block)."""
    num_heads, num_kv_heads = case.q.shape[1], case.k.shape[1]
    group = num_heads // num_kv_heads
    outs = []
    for s in case.seqs:
        new = slice(s.q_start, s.q_start + s.q_len)
        q = case.q[new].astype(np.float64)                                            # [q, N, H]
        k = np.concatenate([s.hist_k, case.k[new]]).astype(np.float64)                # [kv, K, H]
        v = np.concatenate([s.hist_v, case.v[new]]).astype(np.float64)
        k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)               # [kv, N, H]
        scores = np.einsum("qnh,knh->nqk", q, k) * sm_scale
        q_pos = (s.kv_len - s.q_len + np.arange(s.q_len))[:, None]
        k_pos = np.arange(s.kv_len)[None, :]
        key_ids = np.concatenate([np.full(s.kv_len - s.q_len, -1), ids[new]])
        same_block = (ids[new][:, None] == key_ids[None, :]) & (ids[new][:, None] >= 0)
        allowed = np.ones((s.q_len, s.kv_len), bool)
        if use_causal_mask:
            allowed &= (k_pos <= q_pos) | same_block
        if sliding_window is not None:
            allowed &= k_pos > q_pos - sliding_window
        scores = np.where(allowed, scores, -np.inf)
        p = np.exp(scores - scores.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        outs.append(np.einsum("nqk,knh->qnh", p, v))
    return np.concatenate(outs)


def run(case, ids=None, **opts):
    opts.setdefault("sm_scale", case.head_dim ** -0.5)
    out, cache = RPA(*case.args(), None, block_ids=None if ids is None else jnp.asarray(ids), **opts)
    return np.asarray(out), np.asarray(cache)


@pytest.mark.parametrize("dtype,window", [(F32, 37), (F32, 8), (F32, None), (BF16, 37)],
                         ids=["window37-f32", "window8-f32", "full-f32", "window37-bf16"])
def test_blocks_match_the_dense_mask_and_write_the_cache_exactly(dtype, window):
    case = make_case(0, *SPECS, heads=(4, 2, 128), dtype=dtype, **SHAPES)
    ids = block_ids(case)
    out, cache = run(case, ids, sliding_window=window)
    n = case.num_real_tokens
    expected = dense_reference(case, ids, sm_scale=case.head_dim ** -0.5, sliding_window=window)
    np.testing.assert_allclose(out[:n].astype(np.float64), expected, **tol(dtype))
    assert_cache_updated_exactly(case, cache)
    # The check can fail: the causal-only output is far from this reference at the blocks' tokens.
    causal, _ = run(case, sliding_window=window)
    assert np.abs(causal[:n].astype(np.float64) - expected).max() > 0.1


def test_no_blocks_is_bitwise_the_causal_attention():
    """All ids -1 (a text-only step): exactly the output without block ids."""
    case = make_case(1, *SPECS, heads=(4, 2, 128), dtype=F32, **SHAPES)
    with_ids, cache = run(case, np.full(case.q.shape[0], -1, np.int32), sliding_window=37)
    without, cache_without = run(case, sliding_window=37)
    assert_bitwise_equal(with_ids, without)
    assert_bitwise_equal(cache, cache_without)


def test_padding_tokens_ids_are_ignored():
    """Ids on padding tokens (past the last request's tokens) change nothing."""
    case = make_case(2, *SPECS, heads=(4, 2, 128), dtype=F32, **SHAPES)
    ids = block_ids(case)
    n = case.num_real_tokens
    junk = ids.copy()
    junk[n:] = ids[n - 1]  # the last real token's block, continued into the padding
    assert_bitwise_equal(run(case, junk, sliding_window=37)[0][:n], run(case, ids, sliding_window=37)[0][:n])


def test_rejects_block_ids_of_another_length():
    case = make_case(3, *SPECS, heads=(4, 2, 128), dtype=F32, **SHAPES)
    with pytest.raises(ValueError, match="block_ids shape"):
        run(case, np.full(5, -1, np.int32))


# ---------------------------------------------------------------------------
# The model's block ids: runs of vision tokens, split at request boundaries.


def test_run_ids_number_runs_within_requests():
    member = np.array([0, 1, 1, 0, 1, 1, 1, 1, 0, 1, 1, 1], bool)
    #                  request 0  | req. 1 | request 2  | padding
    cu_q_lens = np.array([0, 4, 6, 10, 6, 0], np.int32)  # past num_seqs: junk, pointing at a real start
    distribution = np.array([0, 0, 3], np.int32)
    ids = np.asarray(run_ids(jnp.asarray(member), jnp.asarray(cu_q_lens), jnp.asarray(distribution)))
    # A run crossing from request 1 into 2 is two runs; a run of one token is a run; padding is -1.
    np.testing.assert_array_equal(ids, [-1, 1, 1, -1, 4, 4, 6, 6, -1, 9, -1, -1])


# ---------------------------------------------------------------------------
# The TPU branch's virtual requests, with the portable attention standing in for the kernel.


def stand_in_kernel(captured, **opts):
    """What `attend_blocks_on_tpu` calls on TPU, as the portable attention: non-causal, no cache write.
    Each call's arrays are also handed to `captured` (through a callback), to check them after."""
    def attend(q, k, v, cache, *virtual):
        jax.debug.callback(lambda *arrays: captured.append([np.asarray(a) for a in arrays]), *virtual)
        return ragged_paged_attention(q, k, v, cache, *virtual, use_causal_mask=False, update_kv_cache=False,
                                      **opts)
    return attend


@pytest.mark.parametrize("per_call", [None, 2], ids=["one-call", "two-runs-per-call"])
@pytest.mark.parametrize("window", [37, 8])
def test_tpu_virtual_requests_give_the_block_mask(monkeypatch, per_call, window):
    """`attend_blocks_on_tpu` after a causal call == the portable attention with `block_ids`; each
    call's virtual arrays pass the kernel's own input checks (0 < q_len <= kv_len, pages in the
    table, page ids in the cache) and stay within the scalar memory of the requests' own tables."""
    if per_call is not None:
        monkeypatch.setattr(bidirectional, "max_block_requests", lambda *args: per_call)
    case = make_case(4, *SPECS, heads=(4, 2, 128), dtype=F32, **SHAPES)
    ids = block_ids(case)
    opts = dict(sm_scale=case.head_dim ** -0.5, sliding_window=window)
    captured = []

    @jax.jit
    def tpu_way(q, k, v, cache, *metadata):
        out, cache = ragged_paged_attention(q, k, v, cache, *metadata, **opts)
        return bidirectional.attend_blocks_on_tpu(stand_in_kernel(captured, **opts), out, cache, q, k, v,
                                                  jnp.asarray(ids), *metadata, sliding_window=window,
                                                  page_size=case.page_size)

    out, cache = tpu_way(*case.args())
    expected, _ = run(case, ids, **opts)
    n = case.num_real_tokens
    np.testing.assert_allclose(np.asarray(out)[:n], expected[:n], **F32_TOL)
    assert_cache_updated_exactly(case, np.asarray(cache))

    runs = sum(length >= 2 for _, _, length in RUNS)  # one-token runs are left to the causal call
    assert len(captured) == (1 if per_call is None else -(-runs // per_call))
    assert sum(int(c[3][2]) for c in captured) == runs
    for kv_lens, pages, cu, distribution in captured:
        tpu_rpa.dynamic_validate_inputs(*(jnp.asarray(a) for a in (case.q, case.k, case.v, case.cache)),
                                        jnp.asarray(kv_lens), jnp.asarray(pages), jnp.asarray(cu),
                                        jnp.asarray(distribution))
        assert tpu_rpa.get_smem_estimate_bytes(len(kv_lens), len(pages) // len(kv_lens)) <= \
            tpu_rpa.get_smem_estimate_bytes(len(case.kv_lens), len(case.page_indices) // len(case.kv_lens))


# ---------------------------------------------------------------------------
# dispatch's TPU branch with tpu-inference's real RPA v3 kernel, interpreted on the CPU.

# A batch of test_tpu_kernel_interpret's shapes: 4 decodes, a prefill of 40, chunked prefills (50 of
# 100) and (10 of 70); pages of 16.
KERNEL_RUNS = [(0, 0, 1), (4, 5, 20), (5, 0, 30), (5, 35, 15), (6, 2, 8)]


@pytest.mark.parametrize("dtype,window,mesh_shape", [
    (F32, 8, (1, 2)),
    pytest.param(F32, 37, (1, 1), marks=interpret_slow),
    pytest.param(BF16, 8, (1, 1), marks=interpret_slow),
], ids=["window8-f32-tp2", "window37-f32", "window8-bf16"])
def test_tpu_branch_on_the_real_kernel(tpu_branch, dtype, window, mesh_shape):
    """The kernel's causal call, then its non-causal call over the runs' virtual requests (KV heads
    sharded over two devices in the first case) == the portable attention's block mask; the cache
    is written once, exactly."""
    case = runner_case(8, (4, 2, 128), dtype)
    ids = jnp.asarray(block_ids(case, KERNEL_RUNS))
    out, cache = tpu_branch(case, mesh_shape=mesh_shape, sliding_window=window, block_ids=ids)
    assert_matches_portable(case, out, sliding_window=window, block_ids=ids)
    assert_cache_updated_exactly(case, cache)
    # ... and the runs made a difference the tolerance sees.
    causal, _ = tpu_branch(case, mesh_shape=mesh_shape, sliding_window=window)
    n = case.num_real_tokens
    assert np.abs(causal[:n].astype(np.float32) - out[:n].astype(np.float32)).max() > 0.1


@interpret_slow
def test_tpu_branch_on_a_kv_shared_layer(tpu_branch):
    """update_kv_cache=False (the donor wrote this step's K/V): both kernel calls read the cache only."""
    case = runner_case(9, (4, 2, 128), F32)
    donor_written = expected_cache(case)
    ids = jnp.asarray(block_ids(case, KERNEL_RUNS))
    out, cache = tpu_branch(case, donor_written, sliding_window=8, update_kv_cache=False, block_ids=ids)
    assert_matches_portable(case, out, donor_written, sliding_window=8, update_kv_cache=False, block_ids=ids)
    assert_bitwise_equal(cache, donor_written)


# ---------------------------------------------------------------------------
# Scalar memory: the virtual tables need no more SMEM than the requests' own.

# Gemma 4 31B's sliding layers at tensor parallelism 8: 32 / 8 query heads, 16 / 8 KV heads of 256.
GEMMA4_31B_WINDOW = 1024


@pytest.mark.parametrize("num_tokens", [2048, 8192])
@pytest.mark.parametrize("max_model_len", [8192 << i for i in range(6)])
def test_virtual_tables_fit_the_requests_smem(max_model_len, num_tokens):
    """8k..256k tokens x 1..256 sequences, the page size tpu-inference picks: each kernel call's arrays
    (traced, not computed) pass the kernel's compile-time checks, its SMEM estimate is at most that of
    the requests' own tables (which tpu-inference sizes to fit), and one call takes at least
    min(requests, T / 2) runs, every run of the step where each has >= 2 tokens and one per request."""
    from test_chunked_smem import tpu_inference_page_size
    from tpu_inference.runner.tpu_runner import MIN_NUM_SEQS

    for max_num_seqs in (1, 4, 16, 64, 256):
        page_size = tpu_inference_page_size(max_model_len, max_num_seqs)
        rows = max(max_num_seqs, MIN_NUM_SEQS)
        pages_per_seq = -(-max_model_len // page_size)
        shapes = virtual_shapes(rows, pages_per_seq, num_tokens, page_size)
        kv_lens, page_indices, cu_q_lens, distribution = shapes
        virtual_rows, width = kv_lens.shape[0], page_indices.shape[0] // kv_lens.shape[0]
        where = f"{max_model_len=} {max_num_seqs=} {num_tokens=} {page_size=}: {virtual_rows} x {width}"
        assert tpu_rpa.get_smem_estimate_bytes(virtual_rows, width) <= \
            tpu_rpa.get_smem_estimate_bytes(rows, pages_per_seq), where
        assert virtual_rows >= min(rows, num_tokens // 2), where
        assert width * page_size >= min(GEMMA4_31B_WINDOW + num_tokens - 1, max_model_len), where


def virtual_shapes(rows, pages_per_seq, num_tokens, page_size):
    """The arrays `attend_blocks_on_tpu` hands the kernel, as shapes, checked by the kernel's static validation."""
    bf16 = jnp.bfloat16

    def shape(*s, dtype=jnp.int32):
        return jax.ShapeDtypeStruct(s, dtype)

    seen = []

    def attend(q, k, v, cache, *virtual):
        seen.append(virtual)
        tpu_rpa.static_validate_inputs(q, k, v, cache, *virtual)
        return q, cache

    q, kv = shape(num_tokens, 4, 256, dtype=bf16), shape(num_tokens, 2, 256, dtype=bf16)
    cache = shape(*tpu_rpa.get_kv_cache_shape(64, page_size, 2, 256, bf16), dtype=bf16)
    run = functools.partial(bidirectional.attend_blocks_on_tpu, attend, sliding_window=GEMMA4_31B_WINDOW,
                            page_size=page_size)
    jax.eval_shape(run, q, cache, q, kv, kv, shape(num_tokens), shape(rows), shape(rows * pages_per_seq),
                   shape(rows + 1), shape(3))
    (virtual,) = seen
    return virtual
