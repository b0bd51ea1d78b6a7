"""Bidirectional blocks (Gemma 4's image soft tokens) in a ragged batch, and how the TPU kernel runs them.

With `use_bidirectional_attention="vision"`, transformers masks Gemma 4's sliding layers as
AND(sliding_window, OR(causal, same block)), a block being a contiguous run of image / video
soft tokens: each such token also sees the rest of its run ahead. In a step, `run_ids` numbers
those runs (never across two requests of the packed batch); the portable attention takes them
as `block_ids`.

TPU. tpu-inference's RPA kernel has no such mask, but its non-causal mode
(`use_causal_mask=False`) lets a query at position p see every key in (p - sliding_window,
kv_len) (kernel.py, `flash_attention_step1_qk_softmax`: only `k < kv_len` and
`q < k + sliding_window`; queries are the last q_len positions of kv_len). For the tokens of a
run at positions [s, e), a request whose KV ends at e gives exactly the mask above: keys
before p are the causal ones, keys in (p, e) the run's. So after the usual causal call, which
writes this step's K/V into the cache, a second call attends the runs' tokens non-causally
over *virtual requests*, one per run, with `update_kv_cache=False` (everything read from the
cache just written), and its outputs replace the first call's at those tokens:
- a virtual request's KV starts at the page holding the first key its first query may see,
  s - window + 1 (the window only compares positions, so the shifted origin changes nothing),
  so its page table is only `window + T` tokens wide, not `max_model_len`;
- the kernel reads a request's queries from `cu_q_lens[i]` to `cu_q_lens[i + 1]`, and runs are
  separated by text: the runs' queries are gathered into a dense array first, and the outputs
  scattered back;
- scalar memory: the kernel prefetches the tables into SMEM, where tpu-inference sizes the
  request table (`max_num_seqs x pages_per_seq`) to fit. The virtual table is sized to need no
  more (`max_block_requests`); a step with more runs than fit takes several calls (a loop whose
  trip count is the number of runs over that, 0 in a text-only step, 1 in a usual one).
One-token runs have nothing ahead and are left to the causal call. The runs' tokens are
attended twice (causal, then as a block), which costs about their causal attention again.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from tpu_inference.kernels.ragged_paged_attention.v3.kernel import get_smem_estimate_bytes


def run_ids(member: jax.Array, cu_q_lens: jax.Array, distribution: jax.Array) -> jax.Array:
    """i32[T]: for each token, the packed index of the first token of its run of `member` tokens
    (bool[T]), a run ending at its request's end; -1 for other tokens and padding."""
    num_tokens = member.shape[0]
    t = jnp.arange(num_tokens, dtype=jnp.int32)
    num_seqs = distribution[2]
    member = member & (t < cu_q_lens[num_seqs])
    live = jnp.arange(cu_q_lens.shape[0] - 1) < num_seqs  # entries past num_seqs hold anything
    request_start = jnp.zeros(num_tokens, bool).at[jnp.where(live, cu_q_lens[:-1], num_tokens)].set(
        True, mode="drop")
    previous = jnp.concatenate([jnp.zeros(1, bool), member[:-1]])
    starts = member & (request_start | ~previous)
    # The run's first token is the last start at or before t.
    first = lax.cummax(jnp.where(starts, t, -1))
    return jnp.where(member, first, -1)


def virtual_table_pages(sliding_window: int | None, page_size: int, pages_per_seq: int, num_tokens: int) -> int:
    """Width of a virtual request's page table: a run of at most `num_tokens` tokens and the window
    before it, from a page start."""
    if sliding_window is None:
        return pages_per_seq
    return min(pages_per_seq, -(-(sliding_window + page_size - 2 + num_tokens) // page_size))


def max_block_requests(max_num_seqs: int, pages_per_seq: int, width: int, num_tokens: int) -> int:
    """How many virtual requests one kernel call takes: as many as the runs of a step can be
    (each has >= 2 tokens), but tables needing no more scalar memory than the requests' own."""
    budget = get_smem_estimate_bytes(max_num_seqs, pages_per_seq)
    most = max(1, num_tokens // 2)
    fits = max(1, min(most, max_num_seqs * pages_per_seq // width))
    while fits > 1 and get_smem_estimate_bytes(fits, width) > budget:
        fits -= 1
    return fits


def attend_blocks_on_tpu(attend, out, kv_cache, q, k, v, block_ids, kv_lens, page_indices, cu_q_lens,
                         distribution, *, sliding_window: int | None, page_size: int):
    """Replace `out` [T, N, H] at the tokens of runs of >= 2 tokens by their bidirectional attention.

    `attend(q, k, v, kv_cache, kv_lens, page_indices, cu_q_lens, distribution)` is the kernel
    call, non-causal, not writing the cache; it returns `(out, kv_cache)`. Its q, k, v are the
    runs' tokens, gathered (the TPU kernel reads K/V from the cache when it does not write it).
    """
    num_tokens = q.shape[0]
    max_seqs = kv_lens.shape[0]
    pages_per_seq = page_indices.shape[0] // max_seqs
    width = virtual_table_pages(sliding_window, page_size, pages_per_seq, num_tokens)
    per_call = max_block_requests(max_seqs, pages_per_seq, width, num_tokens)

    t = jnp.arange(num_tokens, dtype=jnp.int32)
    ids = jnp.where(t < cu_q_lens[distribution[2]], block_ids.astype(jnp.int32), -1)  # padding: none
    following = jnp.concatenate([ids[1:], jnp.full((1,), -1, jnp.int32)])
    previous = jnp.concatenate([jnp.full((1,), -1, jnp.int32), ids[:-1]])
    starts = (ids >= 0) & (previous != ids)
    ends = (ids >= 0) & (following != ids)
    run_of = jnp.cumsum(starts) - 1                        # each token's run, counting every run
    # Runs in order: first and last token (index T where there is none).
    run_first = jnp.full(num_tokens, num_tokens, jnp.int32).at[jnp.where(starts, run_of, num_tokens)].set(
        t, mode="drop")
    run_last = jnp.full(num_tokens, num_tokens, jnp.int32).at[jnp.where(ends, run_of, num_tokens)].set(
        t, mode="drop")
    run_len = jnp.where(run_first < num_tokens, run_last - run_first + 1, 0)
    # Only runs of >= 2 tokens become virtual requests, numbered in order.
    kept = run_len >= 2
    num_kept = kept.sum()
    order = jnp.cumsum(kept) - 1
    pick = jnp.where(kept, order, num_tokens)
    first = jnp.zeros(num_tokens, jnp.int32).at[pick].set(run_first, mode="drop")
    length = jnp.zeros(num_tokens, jnp.int32).at[pick].set(run_len, mode="drop")
    token_block = jnp.where(ids >= 0, jnp.where(kept[jnp.clip(run_of, 0)], order[jnp.clip(run_of, 0)], -1), -1)

    # Each token's request and position.
    num_seqs = distribution[2]
    live = jnp.arange(max_seqs) < num_seqs
    ends_of_requests = jnp.where(live, cu_q_lens[1:], jnp.iinfo(jnp.int32).max)
    request = jnp.minimum(jnp.searchsorted(ends_of_requests, t, side="right"), max_seqs - 1).astype(jnp.int32)
    q_lens = jnp.where(live, cu_q_lens[1:] - cu_q_lens[:-1], 0)
    position = kv_lens[request] - q_lens[request] + (t - cu_q_lens[request])
    table = page_indices.reshape(max_seqs, pages_per_seq)

    def one_call(i, carry):
        out, kv_cache = carry
        run = i * per_call + jnp.arange(per_call)  # this call's virtual requests: kept runs, in order
        is_virtual = run < num_kept
        run = jnp.minimum(run, num_tokens - 1)
        f, n = first[run], jnp.where(is_virtual, length[run], 0)
        r, start = request[f], position[f]
        end = start + n
        origin = jnp.zeros_like(start) if sliding_window is None else \
            jnp.maximum(start - sliding_window + 1, 0) // page_size * page_size
        cu = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(n)]).astype(jnp.int32)
        virtual_kv_lens = jnp.where(is_virtual, end - origin, 0).astype(jnp.int32)
        page = jnp.minimum(origin[:, None] // page_size + jnp.arange(width), pages_per_seq - 1)
        virtual_pages = jnp.where(is_virtual[:, None], table[r[:, None], page], 0).reshape(-1)
        count = jnp.minimum(per_call, num_kept - i * per_call)
        distribution = jnp.stack([0, 0, count]).astype(jnp.int32)
        # This call's tokens, gathered in order (slot g of the dense array holds token gather[g]).
        mine = (token_block >= i * per_call) & (token_block < (i + 1) * per_call)
        slot = jnp.where(mine, jnp.cumsum(mine) - 1, num_tokens)
        gather = jnp.zeros(num_tokens, jnp.int32).at[slot].set(t, mode="drop")
        dense_out, kv_cache = attend(q[gather], k[gather], v[gather], kv_cache, virtual_kv_lens,
                                     virtual_pages.astype(jnp.int32), cu, distribution)
        back = jnp.where(t < mine.sum(), gather, num_tokens)
        return out.at[back].set(dense_out, mode="drop"), kv_cache

    calls = (num_kept + per_call - 1) // per_call
    return lax.fori_loop(0, calls, one_call, (out, kv_cache))
