"""Portable ragged paged attention: time per call vs context length, against dense attention.

    python benchmarks/attention.py [--contexts 256 1024 8192] [--batch 8]

Two batch shapes per context length L:
- decode: `batch` requests, one new token each, L tokens of context;
- mixed: one 128-token prefill chunk at the end of an L-token sequence plus `batch - 1` decodes.
The baseline is dense attention over exactly the same (query, key) pairs with the
KV already contiguous: what attention costs with no paging at all. The ratio shows
the price of paging; cost growing with L, not with the cache capacity, shows that
work follows the tokens attended (the page table is sized for 4x the longest L).
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.attention import CacheLayout, ragged_paged_attention

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, PAGE_SIZE = 8, 2, 128, 16


def timed(fn, *args, repeats=5, cache_arg=None):
    """Best wall time of `fn(*args)`; with `cache_arg`, that argument is donated and replaced by the output's."""
    args = list(args)
    best = float("inf")
    for attempt in range(repeats + 1):  # the first call compiles
        start = time.perf_counter()
        out = jax.block_until_ready(fn(*args))
        if attempt:
            best = min(best, time.perf_counter() - start)
        if cache_arg is not None:
            args[cache_arg] = out[1]
    return best


def paged_case(context: int, batch: int, prefill: int, capacity: int, rng):
    """Requests: batch - (1 if prefill) decodes of `context` tokens, then one prefill chunk ending at `context`."""
    q_lens = [1] * (batch - (1 if prefill else 0)) + ([prefill] if prefill else [])
    pages_per_seq = capacity // PAGE_SIZE
    num_pages = pages_per_seq * batch
    layout = CacheLayout(NUM_KV_HEADS, HEAD_DIM, 1)
    cache = jnp.asarray(rng.normal(size=layout.cache_shape(num_pages, PAGE_SIZE)), jnp.float32)
    tokens = sum(q_lens)
    q = jnp.asarray(rng.normal(size=(tokens, NUM_HEADS, HEAD_DIM)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(tokens, NUM_KV_HEADS, HEAD_DIM)), jnp.float32)
    pages = jnp.asarray(rng.permutation(num_pages).astype(np.int32))
    cu = jnp.asarray(np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32))
    kv_lens = jnp.full((batch,), context, jnp.int32)
    decodes = len(q_lens) - (1 if prefill else 0)
    distribution = jnp.asarray([decodes, decodes, batch], jnp.int32)
    return (q, k, k, cache, kv_lens, pages, cu, distribution), q_lens


def dense_case(context: int, q_lens, rng):
    qs = [jnp.asarray(rng.normal(size=(n, NUM_HEADS, HEAD_DIM)), jnp.float32) for n in q_lens]
    kvs = [jnp.asarray(rng.normal(size=(context, NUM_KV_HEADS, HEAD_DIM)), jnp.float32) for _ in q_lens]
    return qs, kvs


@jax.jit
def dense_attention(qs, kvs):
    outs = []
    for q, kv in zip(qs, kvs):
        group = NUM_HEADS // NUM_KV_HEADS
        k = jnp.repeat(kv, group, axis=1)
        s = jnp.einsum("qnh,knh->nqk", q, k) * HEAD_DIM ** -0.5
        q_pos = kv.shape[0] - q.shape[0] + jnp.arange(q.shape[0])
        s = jnp.where(jnp.arange(kv.shape[0])[None, None, :] <= q_pos[None, :, None], s, -jnp.inf)
        outs.append(jnp.einsum("nqk,knh->qnh", jax.nn.softmax(s, axis=-1), k))
    return outs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contexts", type=int, nargs="+", default=[256, 1024, 4096, 16384])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--plot", help="write a PNG of time vs context here")
    args = p.parse_args()
    rng = np.random.default_rng(0)
    capacity = 4 * max(args.contexts)
    # The cache is donated, as the runner donates it, so the KV write is in place.
    rpa = jax.jit(lambda *a: ragged_paged_attention(*a, sm_scale=HEAD_DIM ** -0.5), donate_argnums=3)
    print(f"portable RPA on {jax.devices()[0].platform}: {NUM_HEADS} q heads, {NUM_KV_HEADS} kv heads, "
          f"head dim {HEAD_DIM}, page {PAGE_SIZE}, fp32, page table sized for {capacity} tokens")
    print(f"{'batch':>8} {'context':>8} {'RPA ms':>9} {'dense ms':>9} {'RPA/dense':>10}")
    rows = []
    for kind, prefill in (("decode", 0), ("mixed", 128)):
        for context in args.contexts:
            paged, q_lens = paged_case(context, args.batch, prefill, capacity, rng)
            qs, kvs = dense_case(context, q_lens, rng)
            t_rpa = timed(rpa, *paged, cache_arg=3) * 1e3
            t_dense = timed(dense_attention, qs, kvs) * 1e3
            rows.append((kind, context, t_rpa, t_dense))
            print(f"{kind:>8} {context:>8} {t_rpa:>9.2f} {t_dense:>9.2f} {t_rpa / t_dense:>10.2f}")
    if args.plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for kind in ("decode", "mixed"):
            pts = [(c, r, d) for k, c, r, d in rows if k == kind]
            ax.loglog([c for c, _, _ in pts], [r for _, r, _ in pts], "o-", label=f"{kind}: portable RPA")
            ax.loglog([c for c, _, _ in pts], [d for _, _, d in pts], "x--", label=f"{kind}: dense")
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("ms per call")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot)
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
