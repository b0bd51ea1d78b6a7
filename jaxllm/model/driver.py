"""Step one of our models outside vLLM, the way tpu-inference's runner does (tests and benchmarks).

- `allocate_caches`: one paged KV buffer per layer that keeps its own cache, in
  the runner's layout, in slots of the cache list that need not follow layer
  order; KV-shared layers point at their donor's slot, as the runner maps them;
- `attention_metadata`: the runner's `AttentionMetadata` for a batch of requests;
- `jitted_step`: the model's `__call__`, then `compute_logits` of the rows asked
  for, jitted as the runner jits it (optionally with the caches donated).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tpu_inference.layers.common.attention_metadata import AttentionMetadata

from jaxllm.attention.portable import CacheLayout, dtype_packing

LayerSlots = tuple[tuple[str, int], ...]  # ("layer.{i}", index in the cache list), the runner's map


def allocate_caches(rows: Sequence[tuple[int, int]], kv_share: dict[int, int], dtype, *, num_pages: int,
                    page_size: int, slot_order: Sequence[int] | None = None) -> tuple[list[jax.Array], LayerSlots]:
    """Zeroed caches for layers of (KV heads, head size) `rows`; `kv_share`: {shared layer: donor}.

    `slot_order[n]` is the slot of the n-th layer with a cache of its own (default: in order).
    """
    owners = [i for i in range(len(rows)) if i not in kv_share]
    order = list(range(len(owners))) if slot_order is None else list(slot_order)
    slot_of = {layer: order[n] for n, layer in enumerate(owners)}
    slot_of.update({shared: slot_of[donor] for shared, donor in kv_share.items()})
    caches: list[jax.Array] = [None] * len(owners)
    for i in owners:
        layout = CacheLayout(*rows[i], dtype_packing(dtype))
        caches[slot_of[i]] = jnp.zeros(layout.cache_shape(num_pages, page_size), dtype)
    return caches, tuple((f"layer.{i}", slot_of[i]) for i in range(len(rows)))


def attention_metadata(q_lens: Sequence[int], kv_lens: Sequence[int], page_tables: np.ndarray, *, max_reqs: int,
                       num_tokens: int) -> AttentionMetadata:
    """Request r has q_lens[r] new tokens ending at kv_lens[r] tokens, in pages `page_tables[r]`.

    Requests whose q_len is 1 must come first (the runner's decode-first order);
    tokens past sum(q_lens) are padding, as the runner pads to a bucket.
    """
    total = sum(q_lens)
    positions = np.zeros(num_tokens, np.int32)
    positions[:total] = np.concatenate([np.arange(kv - q, kv) for q, kv in zip(q_lens, kv_lens)])
    cu = np.full(max_reqs + 1, total, np.int32)
    cu[:len(q_lens) + 1] = np.concatenate([[0], np.cumsum(q_lens)])
    seq_lens = np.zeros(max_reqs, np.int32)
    seq_lens[:len(kv_lens)] = kv_lens
    tables = np.zeros((max_reqs, page_tables.shape[1]), np.int32)
    tables[:len(page_tables)] = page_tables
    decodes = next((r for r, q in enumerate(q_lens) if q != 1), len(q_lens))
    return AttentionMetadata(
        input_positions=jnp.asarray(positions), block_tables=jnp.asarray(tables.reshape(-1)),
        seq_lens=jnp.asarray(seq_lens), query_start_loc=jnp.asarray(cu),
        request_distribution=jnp.asarray([decodes, decodes, len(q_lens)], jnp.int32))


def jitted_step(model: nnx.Module, layer_slots: LayerSlots, *, donate_caches: bool):
    """jit(state, caches, ids, metadata, logits_rows, inputs_embeds) -> (caches, logits); `logits_rows`
    None: every token; `inputs_embeds` (a multimodal step's, from `embed_input_ids`) beside the ids."""
    graphdef = nnx.graphdef(model)

    def step(state, caches, ids, metadata, logits_rows=None, inputs_embeds=None):
        m = nnx.merge(graphdef, state)
        caches, hidden, _, _ = m(caches, ids, metadata, inputs_embeds, None, layer_slots)
        return caches, m.compute_logits(hidden if logits_rows is None else hidden[logits_rows])

    return jax.jit(step, donate_argnums=1 if donate_caches else ())
