"""Feed-forward blocks: the gated MLP and the Llama 4 / Gemma 4 mixtures of experts.

How routed experts run is fixed when the model is built (`MoESetup`, from vLLM's config):
- `ROUTED` (everywhere but TPU): under `shard_map`, each device runs only the (token,
  expert) pairs routed to its experts: pairs sorted by expert, each chosen expert's
  rows in chunks through its weights, outputs scattered back to their tokens and
  summed over the devices. Nothing is dropped: every pair runs, however skewed.
- `TPU_GMM`: tpu-inference's grouped-matmul MoE (`fused_moe_func`, the `gmm_tp` /
  `gmm_ep` backends its own models pick), with weights in its fused layout, made
  from the checkpoint as it loads.
- `DENSE`: every expert on every token, unchosen ones weighted 0 (`dense_experts`):
  the reference that tests and benchmarks compare against, never served.

Two layouts, as vLLM users pick them: by default experts are split like the dense
MLP, each device holding every expert's 1/TP slice of F (tensor parallel); with
`--enable-expert-parallel` each device holds E/TP whole experts. Either way the
tokens are replicated over the devices and the expert outputs are summed over them.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
from tpu_inference.layers.common.sharding import ShardingAxisName as Axis
from tpu_inference.utils import get_mesh_shape_product
from vllm.logger import init_logger

from jaxllm import platform
from jaxllm.model import quantization
from jaxllm.model.norms import rms_normalize
from jaxllm.model.params import ones, param
from jaxllm.model.weights import CheckpointError, Rule, transpose

logger = init_logger("vllm.jaxllm.moe")

ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}
# The same activations by the names tpu-inference's fused GMM kernel takes (gate * act, then * up).
GMM_ACTIVATIONS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh"}


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


class ExpertsImpl(enum.Enum):
    ROUTED = "routed"    # only the chosen experts, under shard_map; any backend
    TPU_GMM = "tpu_gmm"  # tpu-inference's gmm_tp / gmm_ep kernels (TPU only)
    DENSE = "dense"      # every expert on every token: the reference for tests and benchmarks


@dataclasses.dataclass(frozen=True)
class MoESetup:
    """How a model's experts are laid out over the mesh and computed."""

    mesh: Mesh
    expert_parallel: bool = False  # whole experts per device (--enable-expert-parallel), else F split
    impl: ExpertsImpl = ExpertsImpl.ROUTED

    @classmethod
    def for_serving(cls, vllm_config, mesh: Mesh) -> MoESetup:
        """What vLLM's flags ask for: tpu-inference's kernels on TPU, the routed path elsewhere."""
        pc = vllm_config.parallel_config
        # tpu-inference's rule for its own models (JaxRoutedExperts._compute_use_ep): the flag
        # counts only when there is more than one device to spread experts over.
        expert_parallel = bool(pc.enable_expert_parallel) and (
            pc.data_parallel_size * pc.prefill_context_parallel_size * pc.tensor_parallel_size > 1)
        on_tpu = platform.on_tpu()
        if on_tpu:
            from tpu_inference import envs

            # Switches to tpu-inference's other MoE backends (fused_moe, megablox, dense_mat).
            others = [name for name in ("USE_MOE_EP_KERNEL", "USE_UNFUSED_MEGABLOCKS", "USE_DENSE_MOE")
                      if getattr(envs, name)]
            if others:
                logger.warning_once("jaxllm: %s ignored: jaxllm's experts run tpu-inference's %s", ", ".join(others),
                                    "gmm_ep" if expert_parallel else "gmm_tp")
        return cls(mesh, expert_parallel, ExpertsImpl.TPU_GMM if on_tpu else ExpertsImpl.ROUTED)

    def shardings(self) -> tuple[tuple, tuple]:
        """Shardings of the [E, D, F] and [E, F, D] weights: E over the expert axis, or F over the tensor axis."""
        if self.expert_parallel:
            return (Axis.EXPERT, None, None), (Axis.EXPERT, None, None)
        return (None, None, Axis.MLP_TENSOR), (None, Axis.MLP_TENSOR, None)

    def check(self, num_experts: int, intermediate: int) -> None:
        """Refuse layouts that don't divide evenly; say once which layout and path the experts use."""
        if self.expert_parallel:
            ways = get_mesh_shape_product(self.mesh, Axis.EXPERT)
            if num_experts % ways:
                raise ValueError(f"expert parallelism over {ways} devices needs a multiple of {ways} experts, "
                                 f"not {num_experts}")
        else:
            ways = get_mesh_shape_product(self.mesh, Axis.MLP_TENSOR)
            if intermediate % ways:
                raise ValueError(f"tensor parallelism over {ways} devices needs an expert width that is a multiple "
                                 f"of {ways}, not {intermediate} (--enable-expert-parallel splits whole experts)")
        layout = "whole experts" if self.expert_parallel else "each expert's width"
        logger.info_once("jaxllm: MoE experts run %s, %s split over %d device(s)", self.impl.value, layout, ways)


def expert_rules(moe: MoESetup, source: str, target: str, gate_up: Callable, down: Callable) -> list[Rule]:
    """Checkpoint rules for one layer's experts (`source`: a regex prefix with one group, the layer;
    `target`: the experts' path).

    `gate_up(w)` turns the checkpoint's fused tensor into (gate [E, D, F], up [E, D, F]),
    `down(w)` its down projection into ([E, F, D],); the layout picks the parameters.
    Per-expert checkpoints (`experts.N.gate_proj.weight`, one torch Linear each, as Llama 4
    Maverick's FP8 release has them) fill the stacked parameters one expert at a time.
    """
    per_expert = source + r"(\d+)\.(gate_proj|up_proj|down_proj)\.weight"
    if moe.impl is ExpertsImpl.TPU_GMM:
        shards = GmmExperts.shards(moe)

        def refuse(w):
            raise CheckpointError("per-expert checkpoint tensors (experts.N.gate_proj.weight) are not supported with "
                                  "tpu-inference's gmm kernels yet: use a checkpoint with fused experts "
                                  "(experts.gate_up_proj)")
        return [Rule(source + r"gate_up_proj", (target + "w13",), lambda w: (gmm_w13(*gate_up(w), shards),)),
                Rule(source + r"down_proj", (target + "w2",), down),
                Rule(per_expert, (target + "w13",), refuse)]
    return [Rule(source + r"gate_up_proj", (target + "gate_proj", target + "up_proj"), gate_up),
            Rule(source + r"down_proj", (target + "down_proj",), down),
            Rule(per_expert, (target + "{2}",), transpose, row="{1}")]


class Experts(nnx.Module):
    """E gated MLPs with weights [E, D, F] / [E, F, D], run routed (or densely, as a reference)."""

    def __init__(self, num_experts: int, hidden: int, intermediate: int, activation: str, dtype,
                 rngs: nnx.Rngs, moe: MoESetup):
        moe.check(num_experts, intermediate)
        self.act = ACTIVATIONS[activation]
        self.moe = moe
        edf, efd = moe.shardings()
        self.gate_proj = param(rngs, (num_experts, hidden, intermediate), dtype, edf)
        self.up_proj = param(rngs, (num_experts, hidden, intermediate), dtype, edf)
        self.down_proj = param(rngs, (num_experts, intermediate, hidden), dtype, efd)

    def __call__(self, x: jax.Array, index: jax.Array, weight: jax.Array, *, weight_inputs: bool,
                 live: jax.Array | None = None) -> jax.Array:
        """sum_j weight[t, j] * expert_{index[t, j]}(x[t]), or expert(weight * x[t]) if `weight_inputs`.

        `index`, `weight`: [T, k], each token's chosen experts and their weights. `live` [T]:
        False for the runner's padding tokens, whose outputs nobody reads: routed, they run no expert.
        """
        w = quantization.expert_weights(self)  # plain, or quantized (an FP8 checkpoint, Qwix rules)
        weights = (w.gate_proj, w.up_proj, w.down_proj)
        if self.moe.impl is ExpertsImpl.DENSE:
            return dense_experts(x, index, weight, *weights, act=self.act, weight_inputs=weight_inputs,
                                 act_rule=w.act_rule)
        return routed_experts(x, index, weight, *weights, act=self.act, weight_inputs=weight_inputs, moe=self.moe,
                              act_rule=w.act_rule, live=live)


def routed_experts(x, index, weight, gate, up, down, *, act, weight_inputs: bool, moe: MoESetup,
                   act_rule=None, live: jax.Array | None = None) -> jax.Array:
    """The chosen experts only, each device running the pairs of the experts it holds (see `_local_experts`).

    The weights are arrays, or Qwix `QArray`s when quantized (an FP8 checkpoint, Qwix rules);
    `act_rule`: the Qwix rule that quantizes the expert inputs too (`quantization.expert_einsum`).
    `live` [T] (default: every token): tokens whose pairs run; the others come out 0.
    """
    tokens = P(Axis.MLP_DATA, None)
    edf, efd = (P(*spec) for spec in moe.shardings())
    expert_axis = Axis.EXPERT if moe.expert_parallel else None  # each device's own experts, else all of them
    reduce_axis = Axis.EXPERT if moe.expert_parallel else Axis.MLP_TENSOR
    local = functools.partial(_local_experts, act=act, weight_inputs=weight_inputs,
                              chunk=chunk_rows(index.size, gate.shape[0]), expert_axis=expert_axis,
                              reduce_axis=reduce_axis, act_rule=act_rule)
    if live is None:
        live = jnp.ones(x.shape[:1], bool)
    return jax.shard_map(local, mesh=moe.mesh, in_specs=(tokens, tokens, tokens, P(Axis.MLP_DATA), edf, edf, efd),
                         out_specs=tokens, check_vma=False)(x, index, weight, live, gate, up, down)


def chunk_rows(pairs: int, num_experts: int) -> int:
    """Rows each expert runs at a time: the largest power of two <= pairs / (2 * experts), 1 to 256.

    An expert's last chunk is padded, so at most experts * (chunk - 1) <= pairs / 2
    padding rows run: the compute stays within 1.5x of the routed FLOPs. Decode
    batches (fewer pairs than twice the experts) run their rows one at a time, which
    costs nothing there: each chosen expert's weights are read once either way.
    """
    return 1 << min(8, max(0, (pairs // (2 * num_experts)).bit_length() - 1))


def _local_experts(x, index, weight, live, gate, up, down, *, act, weight_inputs, chunk, expert_axis, reduce_axis,
                   act_rule):
    """One device: its experts' pairs, sorted by expert, each expert's rows `chunk` at a time.

    x: [T, D] (every token); index, weight: [T, k]; live: [T]; gate, up: [E_local, D, F_local],
    down: [E_local, F_local, D]. With expert parallelism the device holds experts
    [first, first + E_local) and pairs of other experts are skipped; with tensor
    parallelism it holds every expert and a slice of F. Each holds a partial sum of
    the output, summed over `reduce_axis`.
    """
    num_tokens, k = index.shape
    local_experts = gate.shape[0]
    mm = functools.partial(quantization.expert_einsum, act_rule=act_rule)
    first = 0 if expert_axis is None else jax.lax.axis_index(expert_axis) * local_experts
    expert = index.reshape(-1) - first
    here = (expert >= 0) & (expert < local_experts) & jnp.repeat(live, k)
    expert = jnp.where(here, expert, local_experts)  # other devices' (and padding tokens') pairs sort last, never run
    order = jnp.argsort(expert, stable=True)
    token = order // k
    pair_weight = jnp.where(here, weight.reshape(-1), 0)[order].astype(jnp.float32)
    counts = jnp.bincount(expert, length=local_experts + 1)[:local_experts]
    starts = jnp.cumsum(counts) - counts  # each expert's first row in sorted order

    rows = x[token]
    if weight_inputs:
        rows = rows * pair_weight[:, None].astype(x.dtype)
    # `chunk` spare rows, so the last chunk of the last expert stays inside the array.
    rows = jnp.pad(rows, ((0, chunk), (0, 0)))
    used = jnp.nonzero(counts, size=local_experts, fill_value=0)[0]  # the experts with rows, in order

    def run_expert(i, out):
        e = used[i]
        g, u, d = gate[e], up[e], down[e]

        def run_chunk(j, out):
            # A chunk running past this expert's rows computes the next expert's first
            # rows with these weights; the next expert, run later, overwrites them.
            start = starts[e] + j * chunk
            h = jax.lax.dynamic_slice_in_dim(rows, start, chunk)
            h = act(mm("TD,DF->TF", h, g)) * mm("TD,DF->TF", h, u)
            return jax.lax.dynamic_update_slice_in_dim(out, mm("TF,FD->TD", h, d), start, axis=0)

        return jax.lax.fori_loop(0, (counts[e] + chunk - 1) // chunk, run_chunk, out)

    out = jax.lax.fori_loop(0, jnp.count_nonzero(counts), run_expert, jnp.zeros_like(rows))[:index.size]
    out = out.astype(jnp.float32)
    if not weight_inputs:
        out = out * pair_weight[:, None]
    out = jnp.where(here[order][:, None], out, 0)  # rows of other devices' pairs hold spill-over
    combined = jnp.zeros((num_tokens, x.shape[1]), jnp.float32).at[token].add(out)
    return jax.lax.psum(combined.astype(x.dtype), reduce_axis)


def dense_experts(x, index, weight, gate, up, down, *, act, weight_inputs: bool, act_rule=None) -> jax.Array:
    """Every expert on every token, zero weights dropping the unchosen: E / top_k times the routed FLOPs.

    The reference for the routed path (tests, benchmarks); sharded weights are left
    to XLA's partitioner.
    """
    num_tokens, num_experts = x.shape[0], gate.shape[0]
    mm = functools.partial(quantization.expert_einsum, act_rule=act_rule)
    weights = jnp.zeros((num_tokens, num_experts), jnp.float32)
    weights = weights.at[jnp.arange(num_tokens)[:, None], index].add(weight.astype(jnp.float32))
    if weight_inputs:
        x = jnp.einsum("TD,TE->ETD", x, weights.astype(x.dtype))
        h = act(mm("ETD,EDF->ETF", x, gate)) * mm("ETD,EDF->ETF", x, up)
        return mm("ETF,EFD->TD", h, down)
    h = act(mm("TD,EDF->ETF", x, gate)) * mm("TD,EDF->ETF", x, up)
    out = mm("ETF,EFD->ETD", h, down)
    return jnp.einsum("ETD,TE->TD", out, weights.astype(out.dtype))


class GmmExperts(nnx.Module):
    """Experts run by tpu-inference's grouped-matmul MoE on TPU, in the weight layout its kernels read.

    The backend is the one tpu-inference's own models pick by default (`select_moe_backend`):
    `gmm_tp` (F split over the tensor axis) or, with expert parallelism, `gmm_ep`.
    `w13` [E, D, 2F'] holds gate and up side by side in each tensor-parallel shard, each
    half padded to a multiple of 128 lanes; `w2` [E, F, D] is the down projection. The
    kernel routes itself from the router logits (softmax or sigmoid, top-k, optional
    renormalisation) and weights the expert *outputs*.
    """

    def __init__(self, num_experts: int, hidden: int, intermediate: int, activation: str, dtype,
                 rngs: nnx.Rngs, moe: MoESetup):
        moe.check(num_experts, intermediate)
        self.mesh, self.use_ep = moe.mesh, moe.expert_parallel
        self.activation = GMM_ACTIVATIONS[activation]
        shards = self.shards(moe)
        width = shards * _align(intermediate // shards, 128)
        edf, efd = moe.shardings()  # as tpu-inference shards them for gmm_tp / gmm_ep
        self.w13 = param(rngs, (num_experts, hidden, 2 * width), dtype, edf)
        self.w2 = param(rngs, (num_experts, intermediate, hidden), dtype, efd)

    @staticmethod
    def shards(moe: MoESetup) -> int:
        """The tensor-parallel shards each expert's F is split into (1 with expert parallelism)."""
        return 1 if moe.expert_parallel else get_mesh_shape_product(moe.mesh, Axis.MLP_TENSOR)

    def __call__(self, x: jax.Array, logits: jax.Array, *, top_k: int, scoring: str, renormalize: bool):
        from tpu_inference.layers.common.fused_moe_gmm import fused_moe_func

        num_tokens = x.shape[0]
        # The kernel wants tokens * top_k to be a multiple of 16; padding tokens are routed
        # to expert 0 with weight 0 (`num_valid_tokens`) and cut off again.
        pad = -num_tokens % (16 // math.gcd(16, top_k))
        out = fused_moe_func(
            jnp.pad(x, ((0, pad), (0, 0))), self.w13[...], self.w2[...], None, None, None, None,
            jnp.pad(logits, ((0, pad), (0, 0))), topk=top_k, renormalize=renormalize, mesh=self.mesh,
            use_ep=self.use_ep, activation=self.activation, scoring_fn=scoring,
            num_valid_tokens=jnp.int32(num_tokens) if pad else None)
        return out[:num_tokens]


def gmm_w13(gate: np.ndarray, up: np.ndarray, shards: int) -> np.ndarray:
    """gate, up [E, D, F] -> [E, D, shards * 2 * F'']: per shard its F / shards columns of
    gate, then of up, each padded with zeros to F'' (a multiple of 128), as tpu-inference's
    `process_moe_weights` lays out w13 for `gmm_tp` (shards = TP) and `gmm_ep` (1)."""
    num_experts, hidden, width = gate.shape
    local = width // shards
    out = np.zeros((num_experts, hidden, shards, 2, _align(local, 128)), gate.dtype)
    out[..., 0, :local] = gate.reshape(num_experts, hidden, shards, local)
    out[..., 1, :local] = up.reshape(num_experts, hidden, shards, local)
    return out.reshape(num_experts, hidden, -1)


def _align(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


class Llama4MoE(nnx.Module):
    """Sigmoid top-k router whose scores scale the expert *input*, plus an always-on shared expert."""

    def __init__(self, hidden: int, intermediate: int, num_experts: int, top_k: int, dtype, rngs: nnx.Rngs,
                 moe: MoESetup):
        self.top_k = top_k
        self.kernel = moe.impl is ExpertsImpl.TPU_GMM
        self.router = param(rngs, (hidden, num_experts), dtype, (None, None))
        experts = GmmExperts if self.kernel else Experts
        self.experts = experts(num_experts, hidden, intermediate, "silu", dtype, rngs, moe)
        self.shared_expert = GatedMLP(hidden, intermediate, "silu", dtype, rngs)

    @staticmethod
    def setup_for(moe: MoESetup, top_k: int) -> MoESetup:
        """The kernels weight expert outputs. Llama 4 weights each expert's input, which only
        top-1 can fold into the token itself; other top-k run the routed path on TPU too."""
        if moe.impl is ExpertsImpl.TPU_GMM and top_k != 1:
            return dataclasses.replace(moe, impl=ExpertsImpl.ROUTED)
        return moe

    def __call__(self, x: jax.Array, live: jax.Array | None = None) -> jax.Array:
        """`live` [T]: False for padding tokens, whose routed experts need not run (their output is unused)."""
        logits = jnp.einsum("TD,DE->TE", x, self.router[...])
        top, index = jax.lax.top_k(logits, self.top_k)
        scores = jax.nn.sigmoid(top.astype(jnp.float32))
        if self.kernel:
            # Top-1: the token scaled by its score goes to the kernel, whose renormalised
            # top-1 weight is exactly 1 (softmax keeps it > 0, unlike a saturated sigmoid).
            routed = self.experts(x * scores.astype(x.dtype), logits.astype(jnp.float32), top_k=1,
                                  scoring="softmax", renormalize=True)
        else:
            routed = self.experts(x, index, scores, weight_inputs=True, live=live)
        return self.shared_expert(x) + routed


class Gemma4MoE(nnx.Module):
    """Gemma 4's expert branch (it runs beside the layer's dense MLP).

    Router: weightless RMS norm of its input, times `router_scale` and hidden^-0.5,
    projection, softmax over all experts, top-k, renormalised to sum 1, times each
    chosen expert's `per_expert_scale`. The weights scale the expert *outputs*.
    """

    def __init__(self, hidden: int, intermediate: int, num_experts: int, top_k: int, activation: str,
                 eps: float, dtype, rngs: nnx.Rngs, moe: MoESetup):
        self.top_k, self.eps, self.hidden = top_k, eps, hidden
        self.kernel = moe.impl is ExpertsImpl.TPU_GMM
        self.router_proj = param(rngs, (hidden, num_experts), dtype, (None, None))
        self.router_scale = ones((hidden,), dtype)
        # With the kernel, `per_expert_scale` is folded into `experts.w2` once loaded (and reset to 1).
        self.per_expert_scale = ones((num_experts,), dtype)
        experts = GmmExperts if self.kernel else Experts
        self.experts = experts(num_experts, hidden, intermediate, activation, dtype, rngs, moe)

    def router_logits(self, x: jax.Array) -> jax.Array:
        h = rms_normalize(x, self.eps) * self.router_scale[...].astype(x.dtype)
        h = h * jnp.asarray(self.hidden ** -0.5, x.dtype)
        return jnp.einsum("TD,DE->TE", h, self.router_proj[...]).astype(jnp.float32)

    def route(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Each token's top-k experts [T, k] and their fp32 weights [T, k]."""
        probs = jax.nn.softmax(self.router_logits(x), axis=-1)
        top, index = jax.lax.top_k(probs, self.top_k)
        top = top / top.sum(axis=-1, keepdims=True) * self.per_expert_scale[...].astype(jnp.float32)[index]
        return index, top

    def __call__(self, router_input: jax.Array, expert_input: jax.Array, live: jax.Array | None = None) -> jax.Array:
        """`live` [T]: False for padding tokens, whose routed experts need not run (their output is unused)."""
        if self.kernel:
            return self.experts(expert_input, self.router_logits(router_input), top_k=self.top_k,
                                scoring="softmax", renormalize=True)
        return self.experts(expert_input, *self.route(router_input), weight_inputs=False, live=live)

    def fold_per_expert_scale(self) -> None:
        """Kernel layout, after loading: scale each expert's down projection by its `per_expert_scale`
        (the kernel has no per-expert output scale; the down projection is linear, so this is exact)."""
        if not self.kernel:
            return
        w2, scale = self.experts.w2, self.per_expert_scale
        fold = jax.jit(lambda w, s: w * s.astype(w.dtype)[:, None, None], out_shardings=w2.get_value().sharding)
        w2.set_value(fold(w2.get_value(), scale.get_value()))
        scale.set_value(jnp.ones_like(scale.get_value()))
