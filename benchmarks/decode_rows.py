"""Decode steps of few requests: decode rows one at a time vs always in tiles of 8, model step time.

    python benchmarks/decode_rows.py [--reps 5]

The portable attention runs decode rows in tiles of `DECODE_TILE` (8), each row
gathering its own pages; a tile gathers and computes all its rows, live or not, so
a batch of one did 8 rows' work. Below `FEW_DECODE_ROWS` rows it now takes tiles of
one. Both variants are compiled from the same model and weights (the constant is
read at trace time) and run alternately. Models: small Llama 4 and small Gemma 4.
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import alternating, fmt, machine, table  # noqa: E402
from model_driver import Stepper, build_model  # noqa: E402

from jaxllm.attention import portable  # noqa: E402

CASES = (("decode, batch 1", [1], 144), ("decode, batch 2", [1, 1], 144), ("decode, batch 1", [1], 1024),
         ("decode, batch 8", [1] * 8, 1024))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args()
    from jaxllm.checkpoints import cached_checkpoint

    few_rows = portable.FEW_DECODE_ROWS
    rows = []
    for name in ("llama4", "gemma4"):
        model, mesh = build_model(str(cached_checkpoint(name, "small")), 1024 + 16)
        steppers = {"tiles of 8": Stepper(model, mesh, 8, 1024 + 16), "adaptive": Stepper(model, mesh, 8, 1024 + 16)}
        for label, q_lens, context in CASES:
            inputs = steppers["adaptive"].inputs(q_lens, context)

            def step(variant):
                # Read when a step is traced: each stepper traces its own variant on first use.
                portable.FEW_DECODE_ROWS = few_rows if variant == "adaptive" else 0
                steppers[variant].run(False, inputs)

            medians = alternating({variant: functools.partial(step, variant) for variant in steppers}, args.reps)
            portable.FEW_DECODE_ROWS = few_rows
            before, after = medians["tiles of 8"], medians["adaptive"]
            rows.append([name, f"{label}, context {context}", fmt(before * 1e3), fmt(after * 1e3),
                         f"{before / after:.2f}x"])
            print(" | ".join(map(str, rows[-1])), file=sys.stderr, flush=True)
        del model, steppers
    print(f"\n### Decode rows: always tiles of 8 vs one at a time below {few_rows} rows, model step alone "
          f"(median of {args.reps}, alternating; {machine()})\n")
    print(table(["model", "step", "tiles of 8 ms", "adaptive ms", "faster by"], rows))


if __name__ == "__main__":
    main()
