"""Model step FLOPs against the tokens in the batch: compiled, executed, ideal.

    python benchmarks/flops.py [--archs llama4 gemma4] [--batches 1 8 16]

Each small model's jitted step (`benchmarks/model_driver.py`: the model, then its LM head
on the rows the sampler needs) for decode batches at context 144, shaped as
tpu-inference's runner shapes them: tokens padded to its token bucket, logits rows to its
request bucket. Three ways: as before issue #16 (the runner's stock buckets, tokens from 16 and
requests from 8, and every padding token run through the routed experts); stock buckets with
the padding tokens masked out of the routed experts (`CausalLM.live_tokens`); and with the
buckets jaxllm gives the runner off TPU too (tokens from 1 for an fp32 model, requests from 2).

- "XLA": the compiled step's `cost_analysis()["flops"]`. XLA counts each `while` body once
  whatever its trip count, zero included, and a `cond` as its dearest branch; our step's
  attention and routed MoE are such loops, so this figure neither bounds nor estimates the work.
- "executed": XLA's figure with each loop counted for its real trips and each `cond` for
  its taken branch: cost_analysis + (executed - static), the last two counted by running
  the step's jaxpr op by op on the same inputs (`benchmarks/executed_flops.py`; its static
  count, loops once, is printed beside XLA's as a check of the counting).
- "ideal": 2 x active parameters x tokens in the batch (roofline.py's active parameters:
  experts by top-k / E, the LM head, a tied embedding as LM head) plus attention, 4 x heads x
  head dim x keys attended per layer and token (window and chunk limits applied).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from common import fmt, machine, table  # noqa: E402
from executed_flops import executed_flops  # noqa: E402
from model_driver import Stepper, build_model  # noqa: E402
from roofline import DecodeCost  # noqa: E402

from jaxllm.model.causal_lm import CausalLM  # noqa: E402
from jaxllm.model.driver import jitted_step  # noqa: E402

CONTEXT = 144
MAX_REQS, MAX_MODEL_LEN = 16, 512
# name: (first token bucket, first request bucket of tpu-inference's runner, padding masked out of the
# routed experts). The runner's defaults are 16 and 8; off TPU jaxllm's patches make them 1
# for an fp32 model and 2 (MIN_TOKEN_BUCKET and MIN_NUM_SEQS, `jaxllm/vllm_plugin/host.py`).
VARIANTS = {"before: stock buckets, no mask": (16, 8, False), "stock buckets, mask": (16, 8, True),
            "jaxllm buckets, mask": (1, 2, True)}


def bucket(n: int, first: int) -> int:
    """The runner's bucket for n: powers of two from `first` (its exponential padding)."""
    size = first
    while size < n:
        size *= 2
    return size


@contextlib.contextmanager
def padding_runs_the_experts():
    """Trace the model as before the padding mask: every token live."""
    original = CausalLM.live_tokens
    CausalLM.live_tokens = lambda self, metadata, num_tokens: None
    try:
        yield
    finally:
        CausalLM.live_tokens = original


def step_flops(stepper: Stepper, batch: int, tokens: int, rows: int, mask: bool) -> dict[str, float]:
    inputs = stepper.inputs([1] * batch, CONTEXT, num_tokens=tokens, num_rows=rows)
    args = (stepper.state, stepper.caches, *inputs)
    # A fresh jit per variant: the trace depends on the mask, which is not among jit's cache keys.
    step = jitted_step(stepper.model, stepper.layer_slots, donate_caches=True)
    with jax.set_mesh(stepper.mesh), (contextlib.nullcontext() if mask else padding_runs_the_experts()):
        xla = float(step.lower(*args).compile().cost_analysis()["flops"])
        static = executed_flops(step, *args, static=True).flops
        executed = executed_flops(step, *args).flops
    return {"xla": xla, "static": static, "executed": xla + executed - static}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archs", nargs="+", default=["llama4", "gemma4"], choices=["llama4", "gemma4"])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8, 16])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = p.parse_args()
    from jaxllm.checkpoints import cached_checkpoint

    rows = []
    for arch in args.archs:
        checkpoint = str(cached_checkpoint(arch, "small"))
        model, mesh = build_model(checkpoint, MAX_MODEL_LEN)
        stepper = Stepper(model, mesh, MAX_REQS, MAX_MODEL_LEN)
        cost = DecodeCost(checkpoint)
        for batch in args.batches:
            ideal = 2 * cost.active_params() * batch + cost.attention_flops(batch, CONTEXT)
            for name in args.variants:
                first_token, first_request, mask = VARIANTS[name]
                tokens, logits_rows = bucket(batch, first_token), bucket(batch, first_request)
                f = step_flops(stepper, batch, tokens, logits_rows, mask)
                rows.append([arch, batch, name, f"{tokens} / {logits_rows}", fmt(f["xla"] / 1e9),
                             f"{f['static'] / f['xla']:.3f}", fmt(f["executed"] / 1e9), fmt(ideal / 1e9),
                             f"{f['xla'] / ideal:.2f}x", f"{f['executed'] / ideal:.2f}x"])
                print(" | ".join(map(str, rows[-1])), file=sys.stderr, flush=True)
    print(f"\n### Model step FLOPs, decode at context {CONTEXT}, fp32 small checkpoints ({machine()})\n")
    print(table(["model", "batch", "variant", "tokens / logits rows", "XLA GFLOP", "check: static / XLA",
                 "executed GFLOP", "ideal GFLOP", "XLA / ideal", "executed / ideal"], rows))


if __name__ == "__main__":
    main()
