"""MoE dispatch: routed (only the chosen experts run) vs dense (every expert on every token), model step time.

    python benchmarks/moe.py [--reps 5]

jaxllm's Experts run routed when the experts sit on one device and dense when the
expert axis is sharded; here the dense path is forced by pretending the axis is
sharded, so both run on the same model and weights, alternating. Models: small
Llama 4 (8 experts, top-1, every other layer MoE) and small Gemma 4 with its MoE
block on (8 experts, top-2, every layer).
"""

from __future__ import annotations

import argparse
import functools
import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import alternating, fmt, machine, table  # noqa: E402
from model_driver import Stepper, build_model  # noqa: E402

from jaxllm.model import mlp  # noqa: E402

CASES = (("decode, batch 1", [1], 144), ("decode, batch 16", [1] * 16, 144), ("prefill 1024 tokens", [1024], 1024))


def gemma4_moe_config(workdir: Path) -> str:
    from jaxllm.checkpoints import GEMMA4_MOE, cached_checkpoint

    source, out = cached_checkpoint("gemma4", "small"), workdir / "gemma4-small-moe"
    out.mkdir()
    shutil.copy(source / "generation_config.json", out)
    config = json.loads((source / "config.json").read_text())
    config.update(enable_moe_block=True, **GEMMA4_MOE["small"])
    (out / "config.json").write_text(json.dumps(config))
    return str(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args()
    from jaxllm.checkpoints import cached_checkpoint

    real_axis_size = mlp._expert_axis_size
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for name, checkpoint in (("llama4", str(cached_checkpoint("llama4", "small"))),
                                 ("gemma4 + MoE", gemma4_moe_config(Path(workdir)))):
            model, mesh = build_model(checkpoint, 1024 + 16)
            steppers = {"routed": Stepper(model, mesh, 16, 1024 + 16), "dense": Stepper(model, mesh, 16, 1024 + 16)}
            for label, q_lens, context in CASES:
                inputs = steppers["routed"].inputs(q_lens, context)

                def step(variant):
                    # Read at trace time, so each variant's step is compiled with its own dispatch.
                    mlp._expert_axis_size = real_axis_size if variant == "routed" else (lambda: 2)
                    steppers[variant].run(False, inputs)

                medians = alternating({variant: functools.partial(step, variant) for variant in steppers}, args.reps)
                dense, routed = medians["dense"], medians["routed"]
                rows.append([name, label, fmt(dense * 1e3), fmt(routed * 1e3), f"{dense / routed:.2f}x"])
                print(" | ".join(map(str, rows[-1])), file=sys.stderr, flush=True)
            mlp._expert_axis_size = real_axis_size
            del model, steppers
    print(f"\n### MoE dispatch, model step alone (median of {args.reps}, alternating; {machine()})\n")
    print(table(["model", "step", "dense experts ms", "routed experts ms", "routed faster by"], rows))


if __name__ == "__main__":
    main()
