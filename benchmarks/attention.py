"""Portable ragged paged attention: time per call vs context length, against dense attention.

    python benchmarks/attention.py [--contexts 256 1024 4096 16384] [--batch 8] [--plot out.png]

Two batch shapes per context length L:
- decode: `batch` requests, one new token each, L tokens of context;
- mixed: one 128-token prefill chunk at the end of an L-token sequence plus `batch - 1` decodes.
The baseline is dense attention over exactly the same (query, key) pairs with the
KV already contiguous: what attention costs with no paging at all. The ratio shows
the price of paging. RPA and dense take turns and each figure is a median, so
machine load hits both alike.

Second table: the same 8 decodes at one context length with the page table sized
for `max_model_len` = 2x the context vs 128k tokens, and with a cache of 8x more
pages. Equal times show that work follows the tokens attended, not the capacity.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.attention import CacheLayout, ragged_paged_attention

sys.path.insert(0, str(Path(__file__).parent))
from common import fmt, machine  # noqa: E402

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, PAGE_SIZE = 8, 2, 128, 16


class Timed:
    """`fn(*args)` called again and again; with `cache_arg`, that argument is donated and replaced by the output's.
    `out`: the latest call's output."""

    def __init__(self, fn, *args, cache_arg=None):
        self.fn, self.args, self.cache_arg, self.times = fn, list(args), cache_arg, []
        self.call()  # compiles

    def call(self) -> float:
        start = time.perf_counter()
        self.out = jax.block_until_ready(self.fn(*self.args))
        elapsed = time.perf_counter() - start
        if self.cache_arg is not None:
            self.args[self.cache_arg] = self.out[1]
        return elapsed


def median_ms(variants: list[Timed], repeats: int) -> list[float]:
    """Median ms of each variant, called in turns."""
    times = [[] for _ in variants]
    for _ in range(repeats):
        for t, variant in zip(times, variants):
            t.append(variant.call())
    return [float(np.median(t)) * 1e3 for t in times]


def paged_case(context: int, batch: int, prefill: int, table_tokens: int, rng, spare_pages: int = 0):
    """Requests: batch - (1 if prefill) decodes of `context` tokens, then one prefill chunk ending at `context`.

    Each request's page table has room for `table_tokens` (max_model_len); the cache
    holds the pages in use plus `spare_pages`, and tables point at shuffled pages.
    """
    q_lens = [1] * (batch - (1 if prefill else 0)) + ([prefill] if prefill else [])
    pages_per_seq = -(-table_tokens // PAGE_SIZE)
    used_per_seq = -(-context // PAGE_SIZE)
    num_pages = used_per_seq * batch + spare_pages
    layout = CacheLayout(NUM_KV_HEADS, HEAD_DIM, 1)
    cache = jnp.asarray(rng.normal(size=layout.cache_shape(num_pages, PAGE_SIZE)), jnp.float32)
    tokens = sum(q_lens)
    q = jnp.asarray(rng.normal(size=(tokens, NUM_HEADS, HEAD_DIM)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(tokens, NUM_KV_HEADS, HEAD_DIM)), jnp.float32)
    tables = np.zeros((batch, pages_per_seq), np.int32)  # unused entries point at page 0, as the runner's do
    tables[:, :used_per_seq] = rng.permutation(num_pages)[:batch * used_per_seq].reshape(batch, used_per_seq)
    pages = jnp.asarray(tables.reshape(-1))
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
    p.add_argument("--capacity-context", type=int, default=1024,
                   help="context of the page-table / cache size comparison")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--plot", help="write a PNG of time vs context here")
    args = p.parse_args()
    rng = np.random.default_rng(0)
    # The cache is donated, as the runner donates it, so the KV write is in place.
    rpa = jax.jit(lambda *a: ragged_paged_attention(*a, sm_scale=HEAD_DIM ** -0.5), donate_argnums=3)
    print(f"### Portable RPA vs dense attention over the same tokens ({jax.devices()[0].platform}, "
          f"{NUM_HEADS} q heads, {NUM_KV_HEADS} kv heads, head dim {HEAD_DIM}, page {PAGE_SIZE}, fp32, "
          f"batch {args.batch}, page table for 2x the context; median of {args.repeats}, alternating; {machine()})\n")
    print("| batch | context | RPA ms | dense ms | RPA/dense |\n|---|---|---|---|---|")
    rows = []
    for kind, prefill in (("decode", 0), ("mixed", 128)):
        label = (f"{args.batch} decodes" if kind == "decode"
                 else f"{args.batch - 1} decodes + {prefill}-token prefill chunk")
        for context in args.contexts:
            paged, q_lens = paged_case(context, args.batch, prefill, 2 * context, rng)
            qs, kvs = dense_case(context, q_lens, rng)
            t_rpa, t_dense = median_ms([Timed(rpa, *paged, cache_arg=3), Timed(dense_attention, qs, kvs)],
                                       args.repeats)
            rows.append((kind, context, t_rpa, t_dense))
            print(f"| {label} | {context} | {fmt(t_rpa)} | {fmt(t_dense)} | {t_rpa / t_dense:.2f} |", flush=True)

    context = args.capacity_context
    print(f"\n### Same {args.batch} decodes at context {context}, different capacity "
          f"(median of {args.repeats}, alternating)\n")
    variants = {f"page table for {2 * context} tokens": paged_case(context, args.batch, 0, 2 * context, rng)[0],
                "page table for 131072 tokens": paged_case(context, args.batch, 0, 131072, rng)[0],
                "page table for 131072 tokens, 8x the pages in the cache":
                    paged_case(context, args.batch, 0, 131072, rng,
                               spare_pages=7 * args.batch * (-(-context // PAGE_SIZE)))[0]}
    times = median_ms([Timed(rpa, *case, cache_arg=3) for case in variants.values()], args.repeats)
    print("| capacity | RPA ms | vs smallest |\n|---|---|---|")
    for name, t in zip(variants, times):
        print(f"| {name} | {fmt(t)} | {t / times[0]:.2f}x |")
    if args.plot:
        from plot import loglog_png

        series = {}
        for kind, context, t_rpa, t_dense in rows:
            series.setdefault(f"{kind}: portable RPA", []).append((context, t_rpa))
            series.setdefault(f"{kind}: dense", []).append((context, t_dense))
        loglog_png(args.plot, series, "context length (tokens)", "ms per call")
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
