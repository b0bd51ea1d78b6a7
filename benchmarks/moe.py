"""MoE layer step on 4 simulated CPU devices: routed experts vs every expert on every token.

    python benchmarks/moe.py [--reps 5]

Two layers, fp32, dims reduced to fit RAM (the expert counts and top-k are the real ones):
- Scout-like: 16 experts, top-1, hidden 512, expert width 1024, scores scaling the inputs (Llama 4);
- 26B-A4B-like: 128 experts, top-8, hidden 512, expert width 128, weights scaling the outputs (Gemma 4).
Each in both layouts vLLM users pick: tensor parallel (each device holds every expert's
quarter of F) and expert parallel (`--enable-expert-parallel`: each device holds a quarter
of the experts). Steps: decode batches of 1 and 16, a 1024-token prefill. Routing is the
top-k of a random router over random tokens (about even load, like a trained router).

"routed" is what jaxllm runs off TPU (`routed_experts`); "dense" is `dense_experts`, the
reference, on the same sharded weights (XLA partitions it). Both take turns, medians.

FLOPs come from the compiled HLO (`cost_analysis`, the 4 devices summed) against the routed
ideal, 2 x 3 x D x F x tokens x top_k. XLA counts a loop body once whatever its trip count,
so the routed figure is the step's `cost_analysis` plus, per device, the body's (one chunk
through one expert, compiled alone) times the further chunks that device runs.
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import functools  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from common import alternating, fmt, machine, table  # noqa: E402

from jaxllm.model.mlp import ACTIVATIONS, MoESetup, chunk_rows, dense_experts, routed_experts  # noqa: E402

DEVICES = 4


@dataclasses.dataclass(frozen=True)
class Layer:
    name: str
    experts: int
    top_k: int
    hidden: int
    width: int
    weight_inputs: bool


LAYERS = (Layer("Scout-like (16 experts, top-1)", 16, 1, 512, 1024, True),
          Layer("26B-A4B-like (128 experts, top-8)", 128, 8, 512, 128, False))
STEPS = (("decode, batch 1", 1), ("decode, batch 16", 16), ("prefill 1024 tokens", 1024))
ACT = ACTIVATIONS["silu"]


def make_mesh() -> jax.sharding.Mesh:
    return jax.sharding.Mesh(np.array(jax.devices()[:DEVICES]).reshape(1, DEVICES), ("data", "model"),
                             axis_types=(jax.sharding.AxisType.Auto,) * 2)


def weights(layer: Layer, moe: MoESetup, rng) -> tuple[jax.Array, jax.Array, jax.Array]:
    e, d, f = layer.experts, layer.hidden, layer.width
    edf, efd = (jax.NamedSharding(moe.mesh, jax.P(*spec)) for spec in moe.shardings())
    gate, up = (jax.device_put(rng.standard_normal((e, d, f), np.float32) * d ** -0.5, edf) for _ in "gu")
    down = jax.device_put(rng.standard_normal((e, f, d), np.float32) * f ** -0.5, efd)
    return gate, up, down


def routing(layer: Layer, tokens: int, rng) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random tokens, and their top-k experts and weights under a random router."""
    x = rng.standard_normal((tokens, layer.hidden), np.float32)
    logits = x @ rng.standard_normal((layer.hidden, layer.experts), np.float32)
    index = np.argsort(-logits, axis=1)[:, :layer.top_k].astype(np.int32)
    weight = 1 / (1 + np.exp(-np.take_along_axis(logits, index, axis=1)))
    return x, index, weight.astype(np.float32)


def hlo_flops(fn, *args) -> float:
    """FLOPs of one device's compiled program."""
    return float(fn.lower(*args).compile().cost_analysis()["flops"])


def routed_flops(layer: Layer, moe: MoESetup, routed, args, index: np.ndarray) -> float:
    """All devices: the step's cost_analysis (one trip through each loop) plus the chunks beyond it."""
    chunk = chunk_rows(index.size, layer.experts)
    local_experts = layer.experts // DEVICES if moe.expert_parallel else layer.experts
    local_width = layer.width if moe.expert_parallel else layer.width // DEVICES
    body = jax.jit(lambda h, g, u, d: jnp.einsum("TF,FD->TD", ACT(h @ g) * (h @ u), d))
    body_flops = hlo_flops(body, jax.ShapeDtypeStruct((chunk, layer.hidden), jnp.float32),
                           *(jax.ShapeDtypeStruct(s, jnp.float32) for s in [(layer.hidden, local_width)] * 2),
                           jax.ShapeDtypeStruct((local_width, layer.hidden), jnp.float32))
    counts = np.bincount(index.reshape(-1), minlength=layer.experts)
    step_flops, total = hlo_flops(routed, *args), 0.0
    for device in range(DEVICES):
        mine = counts[device * local_experts:(device + 1) * local_experts] if moe.expert_parallel else counts
        chunks = int(np.sum(-(-mine // chunk)))
        total += step_flops + (chunks - 1) * body_flops  # a device with no chunks never runs the body
    return total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args()
    mesh = make_mesh()
    rows = []
    for layer in LAYERS:
        for expert_parallel in (False, True):
            moe = MoESetup(mesh, expert_parallel)
            rng = np.random.default_rng(0)
            gate, up, down = weights(layer, moe, rng)
            options = dict(act=ACT, weight_inputs=layer.weight_inputs)
            routed = jax.jit(functools.partial(routed_experts, **options, moe=moe))
            dense = jax.jit(functools.partial(dense_experts, **options))
            for step, tokens in STEPS:
                x, index, weight = routing(layer, tokens, rng)
                inputs = (x, index, weight, gate, up, down)
                with jax.set_mesh(mesh):
                    np.testing.assert_allclose(np.asarray(routed(*inputs)), np.asarray(dense(*inputs)),
                                               rtol=1e-4, atol=1e-4)
                    medians = alternating({"dense": lambda: dense(*inputs).block_until_ready(),
                                           "routed": lambda: routed(*inputs).block_until_ready()}, args.reps)
                    ideal = 2 * 3 * layer.hidden * layer.width * tokens * layer.top_k
                    dense_flops = DEVICES * hlo_flops(dense, *inputs)
                    executed = routed_flops(layer, moe, routed, inputs, index)
                rows.append([layer.name, "expert parallel" if expert_parallel else "tensor parallel", step,
                             fmt(medians["dense"] * 1e3), fmt(medians["routed"] * 1e3),
                             f"{medians['dense'] / medians['routed']:.2f}x", fmt(ideal / 1e9),
                             f"{dense_flops / ideal:.2f}x", f"{executed / ideal:.2f}x"])
                print(" | ".join(map(str, rows[-1])), file=sys.stderr, flush=True)
    print(f"\n### MoE layer step on {DEVICES} simulated devices (median of {args.reps}, alternating; {machine()})\n")
    print(table(["layer", "layout", "step", "dense ms", "routed ms", "routed faster by", "ideal GFLOP",
                 "dense FLOPs / ideal", "routed FLOPs / ideal"], rows))


if __name__ == "__main__":
    main()
