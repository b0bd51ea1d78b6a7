"""Feed-forward blocks: the gated MLP and the Llama 4 / Gemma 4 mixtures of experts."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from tpu_inference.layers.common.sharding import ShardingAxisName as Axis

from jaxllm.model.norms import rms_normalize
from jaxllm.model.params import ones, param

ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}


class GatedMLP(nnx.Module):
    """down(act(gate(x)) * up(x)), the intermediate dimension split over the tensor axis."""

    def __init__(self, hidden: int, intermediate: int, activation: str, dtype, rngs: nnx.Rngs):
        self.act = ACTIVATIONS[activation]
        self.gate_proj = param(rngs, (hidden, intermediate), dtype, (None, Axis.MLP_TENSOR))
        self.up_proj = param(rngs, (hidden, intermediate), dtype, (None, Axis.MLP_TENSOR))
        self.down_proj = param(rngs, (intermediate, hidden), dtype, (Axis.MLP_TENSOR, None))

    def __call__(self, x: jax.Array) -> jax.Array:
        gate = jnp.einsum("TD,DF->TF", x, self.gate_proj[...])
        up = jnp.einsum("TD,DF->TF", x, self.up_proj[...])
        return jnp.einsum("TF,FD->TD", self.act(gate) * up, self.down_proj[...])


class Experts(nnx.Module):
    """E gated MLPs with weights [E, ...], experts split over the expert-parallel axis."""

    def __init__(self, num_experts: int, hidden: int, intermediate: int, activation: str, dtype,
                 rngs: nnx.Rngs):
        self.act = ACTIVATIONS[activation]
        self.gate_proj = param(rngs, (num_experts, hidden, intermediate), dtype, (Axis.EXPERT, None, None))
        self.up_proj = param(rngs, (num_experts, hidden, intermediate), dtype, (Axis.EXPERT, None, None))
        self.down_proj = param(rngs, (num_experts, intermediate, hidden), dtype, (Axis.EXPERT, None, None))

    def __call__(self, x: jax.Array, weights: jax.Array, *, weight_inputs: bool) -> jax.Array:
        """sum_e weights[t, e] * expert_e(x[t]), or sum_e expert_e(weights[t, e] * x[t]) if `weight_inputs`.

        Every expert runs on every token and zero weights drop the unchosen ones:
        exact, simple, and shardable by expert (each device runs its own experts, the
        sum becomes a reduction across the expert axis). It costs E / top_k times the
        FLOPs of a routed dispatch.
        """
        if weight_inputs:
            x = jnp.einsum("TD,TE->ETD", x, weights.astype(x.dtype))
            gate = jnp.einsum("ETD,EDF->ETF", x, self.gate_proj[...])
            up = jnp.einsum("ETD,EDF->ETF", x, self.up_proj[...])
            return jnp.einsum("ETF,EFD->TD", self.act(gate) * up, self.down_proj[...])
        gate = jnp.einsum("TD,EDF->ETF", x, self.gate_proj[...])
        up = jnp.einsum("TD,EDF->ETF", x, self.up_proj[...])
        out = jnp.einsum("ETF,EFD->ETD", self.act(gate) * up, self.down_proj[...])
        return jnp.einsum("ETD,TE->TD", out, weights.astype(out.dtype))


def top_k_mask(logits: jax.Array, k: int) -> jax.Array:
    """True at each row's k largest entries."""
    _, index = jax.lax.top_k(logits, k)
    return jnp.zeros(logits.shape, bool).at[jnp.arange(logits.shape[0])[:, None], index].set(True)


class Llama4MoE(nnx.Module):
    """Sigmoid top-k router whose scores scale the expert *input*, plus an always-on shared expert."""

    def __init__(self, hidden: int, intermediate: int, num_experts: int, top_k: int, dtype, rngs: nnx.Rngs):
        self.top_k = top_k
        self.router = param(rngs, (hidden, num_experts), dtype, (None, None))
        self.experts = Experts(num_experts, hidden, intermediate, "silu", dtype, rngs)
        self.shared_expert = GatedMLP(hidden, intermediate, "silu", dtype, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        logits = jnp.einsum("TD,DE->TE", x, self.router[...])
        chosen = top_k_mask(logits, self.top_k)
        scores = jnp.where(chosen, jax.nn.sigmoid(logits.astype(jnp.float32)), 0.0)
        return self.shared_expert(x) + self.experts(x, scores, weight_inputs=True)


class Gemma4MoE(nnx.Module):
    """Gemma 4's expert branch (it runs beside the layer's dense MLP).

    Router: weightless RMS norm of its input, times `router_scale` and hidden^-0.5,
    projection, softmax over all experts, top-k, renormalised to sum 1, times each
    chosen expert's `per_expert_scale`. The weights scale the expert *outputs*.
    """

    def __init__(self, hidden: int, intermediate: int, num_experts: int, top_k: int, activation: str,
                 eps: float, dtype, rngs: nnx.Rngs):
        self.top_k, self.eps, self.hidden = top_k, eps, hidden
        self.router_proj = param(rngs, (hidden, num_experts), dtype, (None, None))
        self.router_scale = ones((hidden,), dtype)
        self.per_expert_scale = ones((num_experts,), dtype)
        self.experts = Experts(num_experts, hidden, intermediate, activation, dtype, rngs)

    def route(self, x: jax.Array) -> jax.Array:
        """Dense [T, E] fp32 expert weights, zero outside each token's top k."""
        h = rms_normalize(x, self.eps) * self.router_scale[...].astype(x.dtype)
        h = h * jnp.asarray(self.hidden ** -0.5, x.dtype)
        probs = jax.nn.softmax(jnp.einsum("TD,DE->TE", h, self.router_proj[...]).astype(jnp.float32), axis=-1)
        top, index = jax.lax.top_k(probs, self.top_k)
        top = top / top.sum(axis=-1, keepdims=True) * self.per_expert_scale[...].astype(jnp.float32)[index]
        rows = jnp.arange(x.shape[0])[:, None]
        return jnp.zeros(probs.shape, jnp.float32).at[rows, index].set(top)

    def __call__(self, router_input: jax.Array, expert_input: jax.Array) -> jax.Array:
        return self.experts(expert_input, self.route(router_input), weight_inputs=False)
