"""Feed-forward blocks: the gated MLP and the Llama 4 / Gemma 4 mixtures of experts."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from tpu_inference.layers.common.sharding import ShardingAxisName as Axis

from jaxllm.model import quantization
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

    def __call__(self, x: jax.Array, index: jax.Array, weight: jax.Array, *, weight_inputs: bool) -> jax.Array:
        """sum_j weight[t, j] * expert_{index[t, j]}(x[t]), or expert(weight * x[t]) if `weight_inputs`.

        `index`, `weight`: [T, k], each token's chosen experts and their weights.
        With the experts on one device only the chosen experts run (`_routed`); with
        the expert axis sharded every expert runs on every token (`_dense`), which
        keeps expert parallelism a plain reduction over that axis.
        """
        w = quantization.expert_weights(self)  # plain, or quantized (an FP8 checkpoint, Qwix rules)
        if _expert_axis_size() > 1:
            dense = jnp.zeros((x.shape[0], self.gate_proj.shape[0]), jnp.float32)
            dense = dense.at[jnp.arange(x.shape[0])[:, None], index].add(weight.astype(jnp.float32))
            return self._dense(x, dense, weight_inputs, w)
        return self._routed(x, index, weight, weight_inputs, w)

    def _mlp(self, x: jax.Array, e: jax.Array, w: quantization.ExpertWeights) -> jax.Array:
        mm = functools.partial(quantization.expert_einsum, act_rule=w.act_rule)
        gate = mm("TD,DF->TF", x, w.gate_proj[e])
        up = mm("TD,DF->TF", x, w.up_proj[e])
        return mm("TF,FD->TD", self.act(gate) * up, w.down_proj[e])

    def _dense(self, x: jax.Array, weights: jax.Array, weight_inputs: bool, w: quantization.ExpertWeights) -> jax.Array:
        """Every expert on every token, zero weights dropping the unchosen: E / top_k times the routed FLOPs."""
        mm = functools.partial(quantization.expert_einsum, act_rule=w.act_rule)
        if weight_inputs:
            x = jnp.einsum("TD,TE->ETD", x, weights.astype(x.dtype))
            gate = mm("ETD,EDF->ETF", x, w.gate_proj)
            up = mm("ETD,EDF->ETF", x, w.up_proj)
            return mm("ETF,EFD->TD", self.act(gate) * up, w.down_proj)
        gate = mm("TD,EDF->ETF", x, w.gate_proj)
        up = mm("TD,EDF->ETF", x, w.up_proj)
        out = mm("ETF,EFD->ETD", self.act(gate) * up, w.down_proj)
        return jnp.einsum("ETD,TE->TD", out, weights.astype(out.dtype))

    def _routed(self, x: jax.Array, index: jax.Array, weight: jax.Array, weight_inputs: bool,
                w: quantization.ExpertWeights) -> jax.Array:
        """Token-expert pairs sorted by expert and cut into blocks of `block` rows, one expert per block.

        A loop over the blocks actually used runs each block through its expert, so an
        expert nobody chose is neither read nor computed. Shapes stay static: each
        expert's rows are padded to whole blocks, and `num_blocks` bounds the total.
        """
        tokens, k = index.shape
        num_experts = self.gate_proj.shape[0]
        pairs = tokens * k
        block = _block_rows(pairs, num_experts)
        used_experts = min(num_experts, pairs)
        num_blocks = (pairs + used_experts * (block - 1)) // block  # sum over experts of ceil(rows / block)

        expert = index.reshape(-1)
        order = jnp.argsort(expert, stable=True)
        expert = expert[order]
        token = (jnp.arange(pairs) // k)[order]
        pair_weight = weight.reshape(-1)[order]
        rows = jnp.bincount(expert, length=num_experts)
        blocks = (rows + block - 1) // block
        first_block = jnp.cumsum(blocks) - blocks
        rank = jnp.arange(pairs) - (jnp.cumsum(rows) - rows)[expert]
        slot = first_block[expert] * block + rank  # row of each pair in the padded layout
        padded = num_blocks * block
        slot_token = jnp.zeros(padded, jnp.int32).at[slot].set(token)
        slot_weight = jnp.zeros(padded, jnp.float32).at[slot].set(pair_weight.astype(jnp.float32))
        block_expert = jnp.minimum(jnp.searchsorted(jnp.cumsum(blocks), jnp.arange(num_blocks), side="right"),
                                   num_experts - 1)

        inputs = x[slot_token]
        if weight_inputs:
            inputs = inputs * slot_weight[:, None].astype(x.dtype)
        inputs = inputs.reshape(num_blocks, block, -1)

        def run_block(b, outputs):
            return outputs.at[b].set(self._mlp(inputs[b], block_expert[b], w))

        # Padding rows have weight 0 and are dropped below; blocks past the used ones are skipped.
        outputs = jax.lax.fori_loop(0, blocks.sum(), run_block, jnp.zeros_like(inputs))
        outputs = outputs.reshape(padded, -1)
        if weight_inputs:
            outputs = jnp.where((slot_weight != 0)[:, None], outputs, 0)
        else:
            outputs = outputs * slot_weight[:, None].astype(outputs.dtype)
        return jnp.zeros_like(x).at[slot_token].add(outputs.astype(x.dtype))


def _block_rows(pairs: int, num_experts: int) -> int:
    """Rows per block of the routed dispatch (static: it depends on shapes only).

    Few pairs (decode): reading weights dominates, so one block per chosen expert
    (block = all pairs) reads each chosen expert once. Many pairs (prefill): FLOPs
    dominate, so blocks about the size of an even expert share (a power of two,
    16..256) keep padding below about one block per expert.
    """
    if pairs <= 64:
        return pairs
    share = -(-pairs // num_experts)
    return min(256, max(16, 1 << (share - 1).bit_length()))


def _expert_axis_size() -> int:
    """Devices the expert weights are split over in the current mesh (1 without a mesh)."""
    mesh = jax.sharding.get_abstract_mesh()
    names = Axis.EXPERT if isinstance(Axis.EXPERT, tuple) else (Axis.EXPERT,)
    size = 1
    for name in names:
        if name in mesh.axis_names:
            size *= mesh.shape[name]
    return size


class Llama4MoE(nnx.Module):
    """Sigmoid top-k router whose scores scale the expert *input*, plus an always-on shared expert."""

    def __init__(self, hidden: int, intermediate: int, num_experts: int, top_k: int, dtype, rngs: nnx.Rngs):
        self.top_k = top_k
        self.router = param(rngs, (hidden, num_experts), dtype, (None, None))
        self.experts = Experts(num_experts, hidden, intermediate, "silu", dtype, rngs)
        self.shared_expert = GatedMLP(hidden, intermediate, "silu", dtype, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        logits = jnp.einsum("TD,DE->TE", x, self.router[...])
        top, index = jax.lax.top_k(logits, self.top_k)
        scores = jax.nn.sigmoid(top.astype(jnp.float32))
        return self.shared_expert(x) + self.experts(x, index, scores, weight_inputs=True)


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

    def route(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Each token's top-k experts [T, k] and their fp32 weights [T, k]."""
        h = rms_normalize(x, self.eps) * self.router_scale[...].astype(x.dtype)
        h = h * jnp.asarray(self.hidden ** -0.5, x.dtype)
        probs = jax.nn.softmax(jnp.einsum("TD,DE->TE", h, self.router_proj[...]).astype(jnp.float32), axis=-1)
        top, index = jax.lax.top_k(probs, self.top_k)
        top = top / top.sum(axis=-1, keepdims=True) * self.per_expert_scale[...].astype(jnp.float32)[index]
        return index, top

    def __call__(self, router_input: jax.Array, expert_input: jax.Array) -> jax.Array:
        return self.experts(expert_input, *self.route(router_input), weight_inputs=False)
