"""Decode steps of few requests: decode rows one at a time vs always in tiles of 8, attention call alone.

    python benchmarks/decode_rows.py [--reps 5]

The portable attention runs decode rows in tiles of `Tiling.decode_tile` (8), each
row gathering its own pages; a tile gathers and computes all its rows, live or not,
so a batch of one did 8 rows' work. Below `Tiling.few_decode_rows` rows it takes
tiles of one. Both tilings are passed explicitly to the same call on the same
inputs, alternately (the shapes of benchmarks/attention.py: 8 query heads, 2 KV
heads of 128, pages of 16 tokens, fp32).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from attention import HEAD_DIM, Timed, median_ms, paged_case  # noqa: E402
from common import fmt, machine, table  # noqa: E402

from jaxllm.attention.portable import Tiling, ragged_paged_attention  # noqa: E402

CASES = ((1, 144), (2, 144), (1, 1024), (8, 1024))  # (decode requests, context)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args()
    adaptive = Tiling()
    tilings = {"tiles of 8": dataclasses.replace(adaptive, few_decode_rows=0), "adaptive": adaptive}
    calls = {name: jax.jit(functools.partial(ragged_paged_attention, sm_scale=HEAD_DIM ** -0.5, tiling=tiling),
                           donate_argnums=3) for name, tiling in tilings.items()}
    rows = []
    for batch, context in CASES:
        cases = {name: paged_case(context, batch, 0, 2 * context, np.random.default_rng(0))[0] for name in calls}
        before, after = median_ms([Timed(calls[name], *cases[name], cache_arg=3) for name in calls], args.reps)
        rows.append([f"{batch} decode{'s' * (batch > 1)}, context {context}", fmt(before), fmt(after),
                     f"{before / after:.2f}x"])
        print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
    print(f"\n### Decode rows: always tiles of 8 vs one at a time below {adaptive.few_decode_rows} rows, "
          f"attention call alone (median of {args.reps}, alternating; {machine()})\n")
    print(table(["step", "tiles of 8 ms", "adaptive ms", "faster by"], rows))


if __name__ == "__main__":
    main()
