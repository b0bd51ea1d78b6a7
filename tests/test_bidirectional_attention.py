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

import jax.numpy as jnp
import numpy as np
import pytest

from test_attention import F32, BF16, RPA, assert_bitwise_equal, assert_cache_updated_exactly, make_case, tol

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
