"""Chunked attention's virtual requests within the TPU kernel's scalar memory (SMEM).

RPA v3 prefetches `kv_lens`, `page_indices` and `cu_q_lens` into SMEM, 1 MiB on
v5e and later. tpu-inference picks the KV-cache page size so that the request
table, `max_num_seqs x pages_per_seq` int32s, fills at most half of it; the
virtual requests of `jaxllm.attention.chunked` are up to twice as many rows.
Everything here is arithmetic and shapes (`jax.eval_shape`): nothing runs.
"""

from __future__ import annotations

import functools
import math
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu
from tpu_inference.kernels.ragged_paged_attention.v3 import kernel as tpu_rpa
from tpu_inference.layers.vllm.backends.flash_attn import PallasAttentionBackend
from tpu_inference.runner.tpu_runner import MIN_NUM_SEQS

from jaxllm.attention.chunked import check_page_size, max_virtual_requests, virtual_batches

# Llama 4 Scout (DESIGN.md §9), served as in the README: bf16 cache, tensor parallelism 8,
# so each chip holds 40 / 8 query heads and 8 / 8 KV heads of size 128.
SCOUT_CHUNK = 8192
SCOUT_MAX_POSITIONS = 10_485_760  # its config's max_position_embeddings
TP = 8
HEADS, KV_HEADS, HEAD_DIM = 40 // TP, 8 // TP, 128
CACHE_DTYPE = jnp.bfloat16

CONTEXTS = [8192 << i for i in range(6)]    # 8k .. 256k
MAX_NUM_SEQS = [1 << i for i in range(9)]   # 1 .. 256
STEP_TOKENS = {"tpu-default": 2048,         # vLLM's largest TPU default (v6e, LLM class)
               "whole-context": None}       # one prefill of max_model_len in one step

# What tpu-inference assumes of SMEM: 1 MiB (layers/vllm/backends/flash_attn.py:109, the
# figure jax's chip table gives v5e/v6e), of which the request table may fill half
# (flash_attn.py:114-120, get_min_page_size: `1024 * 1024 // 2 // max_num_seqs // 4`).
SMEM_BYTES = pltpu.get_tpu_info_for_chip(pltpu.ChipVersion.TPU_V6E, 1).smem_capacity_bytes
TABLE_BUDGET = SMEM_BYTES // 2
INT32 = 4


def tpu_inference_page_size(max_model_len: int, max_num_seqs: int) -> int:
    """The block size tpu-inference gives a model without --block-size (platforms/tpu_platform.py:453-473):
    `get_page_size`, raised to `get_min_page_size` where the table would not fit half of SMEM."""
    config = SimpleNamespace(model_config=SimpleNamespace(max_model_len=max_model_len),
                             scheduler_config=SimpleNamespace(max_num_seqs=max_num_seqs))
    return max(PallasAttentionBackend.get_page_size(config), PallasAttentionBackend.get_min_page_size(config))


@functools.cache
def virtual_shapes(rows: int, pages_per_seq: int, num_tokens: int, page_size: int):
    """Shapes of the arrays `virtual_batches` hands the kernel, traced, not computed."""
    requests = (jax.ShapeDtypeStruct((rows,), jnp.int32), jax.ShapeDtypeStruct((rows * pages_per_seq,), jnp.int32),
                jax.ShapeDtypeStruct((rows + 1,), jnp.int32), jax.ShapeDtypeStruct((3,), jnp.int32))
    split = functools.partial(virtual_batches, chunk_size=SCOUT_CHUNK, page_size=page_size, num_tokens=num_tokens)
    return jax.eval_shape(split, *requests)


def smem_figures(max_model_len: int, max_num_seqs: int, num_tokens: int) -> dict:
    """SMEM of one chunked layer's kernel call at this configuration, as the kernel itself counts it."""
    page_size = tpu_inference_page_size(max_model_len, max_num_seqs)
    rows = max(max_num_seqs, MIN_NUM_SEQS)              # runner/tpu_runner.py:1078, request rows the step passes
    pages_per_seq = math.ceil(max_model_len / page_size)  # runner/tpu_runner.py:1074
    kv_lens, page_indices, cu_q_lens, distribution = virtual_shapes(rows, pages_per_seq, num_tokens, page_size)
    virtual_rows = kv_lens.shape[0]
    # The kernel infers the row width as it does here (kernel.py: num_page_indices // max_num_seqs),
    # and checks the three arrays agree on the rows.
    width = page_indices.shape[0] // virtual_rows
    _validate_layout(num_tokens, page_size, kv_lens, page_indices, cu_q_lens, distribution)
    # Before: every virtual request carried its request's whole row (2R + T // C + 1 rows then).
    old_rows = 2 * rows + num_tokens // SCOUT_CHUNK + 1
    return dict(
        page_size=page_size, rows=rows, pages_per_seq=pages_per_seq, virtual_rows=virtual_rows, width=width,
        requests=tpu_rpa.get_smem_estimate_bytes(rows, pages_per_seq),
        new=tpu_rpa.get_smem_estimate_bytes(virtual_rows, width), new_table=virtual_rows * width * INT32,
        old=tpu_rpa.get_smem_estimate_bytes(old_rows, pages_per_seq), old_table=old_rows * pages_per_seq * INT32)


def _validate_layout(num_tokens, page_size, kv_lens, page_indices, cu_q_lens, distribution):
    """The kernel's own compile-time checks, on shapes: one Scout shard's q/k/v/cache and the virtual arrays."""
    def shape(*s, dtype=CACHE_DTYPE):
        return jax.ShapeDtypeStruct(s, dtype)
    cache = shape(*tpu_rpa.get_kv_cache_shape(1024, page_size, KV_HEADS, HEAD_DIM, CACHE_DTYPE))
    tpu_rpa.static_validate_inputs(shape(num_tokens, HEADS, HEAD_DIM), shape(num_tokens, KV_HEADS, HEAD_DIM),
                                   shape(num_tokens, KV_HEADS, HEAD_DIM), cache,
                                   kv_lens, page_indices, cu_q_lens, distribution)


@pytest.mark.parametrize("step", STEP_TOKENS)
@pytest.mark.parametrize("max_model_len", CONTEXTS)
def test_virtual_requests_fit_the_smem_tpu_inference_budgets(max_model_len, step):
    """Llama 4 Scout, chunk 8192, 8k..256k tokens x 1..256 sequences, the page size tpu-inference picks:
    the kernel's SMEM estimate for a chunked layer's virtual batch fits the chip's 1 MiB, and its table
    fits the half tpu-inference gives the request table, plus one chunk-wide row per chunk that the
    step's prefills cross: 2R rows of C / page_size pages are at most R rows of max_model_len / page_size
    from max_model_len 2C on, where chunking starts to matter (below it Llama 4 turns it off).

    Before, every virtual request carried its request's whole row, 2R + T // C + 1 rows of
    max_model_len / page_size: 513 x 512 x 4 = 1,050,624 bytes at 128k x 256 (T < C), over SMEM
    before the kernel's other scalars."""
    num_tokens = STEP_TOKENS[step] or max_model_len
    for max_num_seqs in MAX_NUM_SEQS:
        f = smem_figures(max_model_len, max_num_seqs, num_tokens)
        where = f"max_model_len {max_model_len}, max_num_seqs {max_num_seqs}, {num_tokens} tokens: {f}"
        check_page_size(SCOUT_CHUNK, f["page_size"])  # pages divide the chunk everywhere on this grid
        assert f["width"] == min(SCOUT_CHUNK // f["page_size"], f["pages_per_seq"]), where
        assert f["virtual_rows"] == max_virtual_requests(f["rows"], num_tokens, SCOUT_CHUNK), where
        # tpu-inference's own promise for the requests' table, which the rest leans on.
        assert f["rows"] * f["pages_per_seq"] * INT32 <= TABLE_BUDGET, where
        assert f["new"] <= SMEM_BYTES, where
        prefill_rows = max(num_tokens - f["rows"], 0) // SCOUT_CHUNK
        assert f["new_table"] <= TABLE_BUDGET + prefill_rows * f["width"] * INT32, where


def test_full_width_virtual_tables_overflowed_smem():
    """The figures of the issue: at 128k x 256 the old full-width virtual table alone was over 1 MiB,
    and so it was at every power-of-two max_model_len from 16k with 128 or more sequences."""
    f = smem_figures(131072, 256, 2048)
    assert (f["page_size"], f["rows"], f["pages_per_seq"]) == (256, 256, 512)
    assert f["old_table"] == 513 * 512 * 4 == 1_050_624 > SMEM_BYTES
    assert f["new_table"] == 512 * 32 * 4 == 65_536
    for max_model_len in CONTEXTS[1:]:
        assert smem_figures(max_model_len, 128, 2048)["old"] > SMEM_BYTES, max_model_len


def test_a_page_larger_than_the_chunk_is_a_clear_error():
    """Scout's whole 10M context with 256 sequences: tpu-inference picks 32768-token pages to fit the
    request table, and a chunk boundary then falls inside a page, which the kernel can't start a
    request at. The error says which block size would do and how many sequences it allows."""
    page_size = tpu_inference_page_size(SCOUT_MAX_POSITIONS, 256)
    assert page_size == 32768
    allowed = PallasAttentionBackend.get_max_num_seqs(SCOUT_MAX_POSITIONS, SCOUT_CHUNK)
    assert allowed == 102
    pages_per_seq = SCOUT_MAX_POSITIONS // page_size
    with pytest.raises(ValueError, match=f"--block-size {SCOUT_CHUNK}; .* up to {allowed} sequences"):
        virtual_shapes(256, pages_per_seq, 2048, page_size)
    with pytest.raises(ValueError, match="not a multiple of the KV-cache page size 48.*--block-size 16"):
        check_page_size(SCOUT_CHUNK, 48)


def test_max_virtual_requests_is_reached_and_never_exceeded():
    """The bound `2n + (T - n) // C` (n = min(requests, T)) is exact: every request straddling a chunk
    boundary with its T // n tokens, and the leftover tokens in one long prefill, reach it; random
    batches stay within it."""
    chunk, rows, num_tokens = 8, 4, 24
    bound = max_virtual_requests(rows, num_tokens, chunk)
    assert bound == 2 * 4 + 20 // 8 == 10

    def pieces(kv_lens, q_lens):
        cu = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
        distribution = np.array([0, 0, len(q_lens)], np.int32)
        split = jax.jit(functools.partial(virtual_batches, chunk_size=chunk, page_size=4, num_tokens=num_tokens))
        virtual = split(jnp.asarray(kv_lens, jnp.int32), jnp.arange(rows * 16, dtype=jnp.int32),
                        jnp.asarray(cu), jnp.asarray(distribution))
        assert virtual[0].shape == (bound,) and virtual[1].shape == (bound * chunk // 4,)
        return int(virtual[3][2])

    # Three requests of 2 queries across a boundary (2 pieces each), one of 18 queries from
    # position 7: 7 | 8..15 | 16..23 | 24 -> 4 pieces.
    assert pieces([9, 17, 33, 25], [2, 2, 2, 18]) == 10 == bound
    rng = np.random.default_rng(0)
    for _ in range(20):
        q_lens = rng.multinomial(num_tokens - rows, np.ones(rows) / rows) + 1
        kv_lens = q_lens + rng.integers(0, 40, rows)
        assert pieces(kv_lens, q_lens) <= bound
