"""The portable attention on decode batches: this checkout against an earlier revision of it, side by side.

    python benchmarks/decode_attention.py [--before 4718778] [--reps 7] [--archs llama4 gemma4]

`--before` names a git revision; its `jaxllm/attention/portable.py` is loaded beside the
current one (the default is main before issue #16's decode-row change: scores and p @ v
as batched dots, K/V blocks of 256 tokens, this step's K/V overlaid on the cache). Both are
jitted the same way (cache donated, as the runner does), take turns, and each figure is a
median, so machine load hits both alike. Two tables:
- the attention call alone, shapes from benchmarks/attention.py (8 query and 2 KV heads of
  128, pages of 16 tokens); every request decodes one token at `context`;
- the model step alone (benchmarks/model_driver.py) of each small checkpoint, decoding at
  context 144, once traced with each attention, in one process.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import numpy as np

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from attention import HEAD_DIM, Timed, median_ms, paged_case  # noqa: E402
from common import alternating, fmt, machine, table  # noqa: E402
from model_driver import Stepper, build_model  # noqa: E402

from jaxllm.attention import dispatch, portable  # noqa: E402

CASES = ((1, 144), (1, 4096), (8, 144), (8, 1024), (16, 144), (16, 1024), (16, 4096))  # (decodes, context)
MODEL_BATCHES, MODEL_CONTEXT, MAX_MODEL_LEN, MAX_REQS = (1, 8, 16), 144, 512, 16


def portable_at(revision: str):
    """jaxllm/attention/portable.py as it was at `revision`, imported as a module of its own."""
    source = subprocess.run(["git", "show", f"{revision}:jaxllm/attention/portable.py"], cwd=HERE.parent,
                            check=True, capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / f"portable_{revision}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    return module


def model_steps(arch: str, attentions: dict, reps: int) -> list[list[str]]:
    """The model step at each of MODEL_BATCHES, traced with each attention in turn, timed in turns."""
    from jaxllm.checkpoints import cached_checkpoint

    model, mesh = build_model(str(cached_checkpoint(arch, "small")), MAX_MODEL_LEN)
    rows = []
    for batch in MODEL_BATCHES:
        runs = {}
        for name, attention in attentions.items():
            stepper = Stepper(model, mesh, MAX_REQS, MAX_MODEL_LEN)
            inputs = stepper.inputs([1] * batch, MODEL_CONTEXT, num_rows=max(2, batch))
            dispatch.ragged_paged_attention = attention  # what the layers call, looked up as the step traces
            try:  # twice: the second call traces again, its caches now the first call's (committed) outputs
                stepper.run(False, inputs)
                stepper.run(False, inputs)
            finally:
                dispatch.ragged_paged_attention = portable.ragged_paged_attention
            runs[name] = functools.partial(stepper.run, False, inputs)
        seconds = alternating(runs, reps)
        rows.append([arch, f"decode, batch {batch}, context {MODEL_CONTEXT}", fmt(seconds["before"] * 1e3),
                     fmt(seconds["after"] * 1e3), f"{seconds['before'] / seconds['after']:.2f}x"])
        print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before", default="4718778")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--archs", nargs="*", default=["llama4", "gemma4"], choices=["llama4", "gemma4"],
                   help="small checkpoints whose model step to time (none: the attention call only)")
    args = p.parse_args()
    earlier = portable_at(args.before)
    calls = {name: jax.jit(functools.partial(module.ragged_paged_attention, sm_scale=HEAD_DIM ** -0.5),
                           donate_argnums=3)
             for name, module in (("before", earlier), ("after", portable))}
    rows = []
    for batch, context in CASES:
        cases = {name: paged_case(context, batch, 0, 2 * context, np.random.default_rng(0))[0] for name in calls}
        timed = [Timed(calls[name], *cases[name], cache_arg=3) for name in calls]
        before, after = median_ms(timed, args.reps)
        difference = np.abs(np.asarray(timed[0].out[0]) - np.asarray(timed[1].out[0])).max()
        rows.append([f"{batch} decode{'s' * (batch > 1)}, context {context}", fmt(before), fmt(after),
                     f"{before / after:.2f}x", f"{difference:.1e}"])
        print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
    print(f"\n### Portable attention, decode batches: {args.before} vs this checkout, attention call alone "
          f"(median of {args.reps}, alternating; {machine()})\n")
    print(table(["step", "before ms", "after ms", "faster by", "max |out difference|"], rows))
    if args.archs:
        attentions = {"before": earlier.ragged_paged_attention, "after": portable.ragged_paged_attention}
        rows = [row for arch in args.archs for row in model_steps(arch, attentions, 4 * args.reps)]
        print(f"\n### Model step alone with each attention, fp32 small checkpoints (median of {4 * args.reps}, "
              f"alternating; {machine()})\n")
        print(table(["model", "step", "before ms", "after ms", "faster by"], rows))


if __name__ == "__main__":
    main()
