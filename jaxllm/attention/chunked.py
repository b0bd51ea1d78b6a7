"""Llama 4's chunked-local attention as plain causal attention over virtual requests.

TPU's ragged paged attention kernel has causal and sliding-window masks but no
chunk mask. A query at position p may attend to keys in [p // C * C, p] (chunk size
C): that is causal attention for a sequence that starts at its chunk's start. So
each request's queries are split where they cross a chunk boundary, and each piece
becomes a virtual request whose KV is its chunk so far: `kv_len` counts from the
chunk start, and its page table starts at the chunk's first page (C must be a
multiple of the page size). The pieces keep their tokens where they are in the
packed batch, in order, so outputs need no reordering, and each new token is
written to the same page and slot as before. vLLM does the same on GPU
(`make_local_attention_virtual_batches`); this version is jittable, with static
shapes (`max_virtual_requests`).

Scalar memory. The kernel prefetches `kv_lens`, `page_indices` and `cu_q_lens`
into SMEM (1 MiB on v5e and later), and tpu-inference sizes pages so that the
request table, `max_num_seqs x pages_per_seq` int32s, fills at most half of it.
There are up to twice as many virtual requests as requests, so each virtual
request's table row covers only its chunk, `C / page_size` pages: the kernel
reads the row width off the arrays (`len(page_indices) // len(kv_lens)`). From
`max_model_len` 2C on, that is at most half the requests' width, so 2R virtual
rows fit where the R requests' rows do; only prefills longer than a chunk add
rows, `(T - R) // C` for T tokens (tests/test_chunked_smem.py).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def max_virtual_requests(max_num_seqs: int, num_tokens: int, chunk_size: int) -> int:
    """How many virtual requests a batch of `num_tokens` query tokens in `max_num_seqs` requests can make.

    A request of q queries spans at most `(q - 1) // C + 2` chunks, so n requests with
    T tokens in all make at most `2n + (T - n) // C` pieces; that grows with n, and
    n <= min(max_num_seqs, T) since every live request has a query.
    """
    live = min(max_num_seqs, num_tokens)
    return 2 * live + (num_tokens - live) // chunk_size


def check_page_size(chunk_size: int, page_size: int, max_len: int | None = None) -> None:
    """A virtual request's KV starts at a chunk start, which the kernel can address only at a page start."""
    if chunk_size % page_size == 0:
        return
    fit = math.gcd(chunk_size, page_size)
    hint = ""
    if max_len is not None:
        from tpu_inference.layers.vllm.backends.flash_attn import PallasAttentionBackend
        hint = (f"; with it, tpu-inference's scalar-memory rule allows up to "
                f"{PallasAttentionBackend.get_max_num_seqs(max_len, fit)} sequences (--max-num-seqs)")
    raise ValueError(
        f"attention chunk {chunk_size} is not a multiple of the KV-cache page size {page_size}: chunked "
        f"attention on TPU runs each chunk as a request whose pages start at the chunk start. Serve with a "
        f"page size that divides the chunk, e.g. --block-size {fit}{hint}")


def virtual_batches(
    kv_lens: jax.Array,       # i32[R]
    page_indices: jax.Array,  # i32[R * pages_per_seq]
    cu_q_lens: jax.Array,     # i32[R + 1]
    distribution: jax.Array,  # i32[3]: (decode_end, prefill_end, num_seqs)
    *,
    chunk_size: int,
    page_size: int,
    num_tokens: int,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """The same four arrays for the virtual requests; attend to them causally, with no chunk mask."""
    max_seqs = kv_lens.shape[0]
    pages_per_seq = page_indices.shape[0] // max_seqs
    check_page_size(chunk_size, page_size, pages_per_seq * page_size)
    chunk_pages = min(chunk_size // page_size, pages_per_seq)  # the width of a virtual request's table
    max_virtual = max_virtual_requests(max_seqs, num_tokens, chunk_size)
    num_seqs = distribution[2]

    live = jnp.arange(max_seqs) < num_seqs
    q_lens = jnp.where(live, cu_q_lens[1:] - cu_q_lens[:-1], 0)
    first_pos = kv_lens - q_lens                     # position of each request's first query
    first_chunk = first_pos // chunk_size
    pieces = jnp.where(q_lens > 0, (kv_lens - 1) // chunk_size - first_chunk + 1, 0)
    pieces_end = jnp.cumsum(pieces)                  # virtual requests [pieces_end[r-1], pieces_end[r]) are r's
    num_virtual = pieces_end[-1]

    v = jnp.arange(max_virtual)
    request = jnp.minimum(jnp.searchsorted(pieces_end, v, side="right"), max_seqs - 1)
    is_virtual = v < num_virtual
    chunk_start = (first_chunk[request] + v - (pieces_end[request] - pieces[request])) * chunk_size
    q_start_pos = jnp.maximum(first_pos[request], chunk_start)
    end_pos = jnp.minimum(kv_lens[request], chunk_start + chunk_size)

    total_tokens = cu_q_lens[num_seqs]
    token_start = jnp.where(is_virtual, cu_q_lens[request] + q_start_pos - first_pos[request], total_tokens)
    virtual_cu_q_lens = jnp.concatenate([token_start, total_tokens[None]])
    virtual_kv_lens = jnp.where(is_virtual, end_pos - chunk_start, 0)
    first_page = chunk_start // page_size
    page = jnp.minimum(first_page[:, None] + jnp.arange(chunk_pages), pages_per_seq - 1)
    virtual_pages = page_indices.reshape(max_seqs, pages_per_seq)[request[:, None], page]
    virtual_pages = jnp.where(is_virtual[:, None], virtual_pages, 0).reshape(-1)
    # Decode requests come first and each yields pieces that are still decodes.
    decode_end = jnp.where(distribution[0] > 0, pieces_end[jnp.maximum(distribution[0] - 1, 0)], 0)
    virtual_distribution = jnp.stack([decode_end, decode_end, num_virtual]).astype(jnp.int32)
    return (virtual_kv_lens.astype(jnp.int32), virtual_pages.astype(jnp.int32),
            virtual_cu_q_lens.astype(jnp.int32), virtual_distribution)
