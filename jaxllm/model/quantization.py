"""Quantized weights: FP8 checkpoints in Llama 4 Maverick's format, and Qwix rules on our experts.

Two ways weights get quantized, both kept in Qwix's representation (a `WithAux`
holding a `QArray` of `qvalue` and `scale` params), so one code path runs them:

- Pre-quantized checkpoints (`quantization_config` in the HF config). Accepted:
  the format of Meta's Llama-4-Maverick-17B-128E-Instruct-FP8, compressed-tensors'
  "float-quantized" FP8 with one static scale per output channel, on the routed
  experts only (`...experts.{e}.{gate,up,down}_proj.weight` in float8_e4m3fn and
  `.weight_scale` [out, 1]). The experts are created in that form and loaded as
  stored; each step multiplies by `qvalue * scale` of the layer it runs, so the
  model is never dequantized up front. Which `quantization_config` is accepted, and
  the refusal of any other by name, is `jaxllm.model.checkpoint_quantization`.
- Qwix rules from `--additional_config '{"quantization": {"qwix": {"rules": [...]}}}'`,
  applied by tpu-inference's `apply_qwix_quantization` after loading, as for its own
  models: Qwix intercepts the model's einsums and quantizes the weights they read.
  Our routed experts index one expert's weight inside a loop, which Qwix can't see,
  so `expert_weights` quantizes the stacked weights itself, with the rule Qwix
  would apply to the equivalent einsum (tpu-inference does the same for its sparse
  MoE, `qwix_utils.manually_quantize_qwix_weight`).

Numerics. A quantized matmul is Qwix's: with unquantized activations it
dequantizes the weight (fused into the dot by XLA), with activations quantized by
the rule (`act_qtype`, dynamic per token) it multiplies the quantized values and
scales the output. XLA's CPU backend runs fp8 and int8 dots by upcasting, so the CPU
computes what a TPU computes, to float rounding.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qwix._src.interception import disable_interceptions

from jaxllm.model.checkpoint_quantization import EXPERT_PROJECTIONS

# --------------------------------------------------------------------------------------------
# FP8 checkpoints (`checkpoint_quantization.Fp8Experts`).


def fp8_expert_weight(rngs: nnx.Rngs, shape: tuple[int, int, int], sharding: tuple):
    """A stacked expert weight [E, in, out] as the checkpoint stores it: FP8 values and a scale per
    (expert, output channel), [E, 1, out], in Qwix's form (what `expert_weights` reads)."""
    from qwix._src.core.qarray import HowToQuantize, QArray
    from qwix._src.providers.ptq import WithAux

    from jaxllm.model.params import INIT_STD

    # Random values (load_format=dummy), replaced by the checkpoint's when it loads.
    value = (jax.random.normal(rngs.params(), shape, jnp.float32) * INIT_STD / 2**-6).astype(jnp.float8_e4m3fn)
    scale = jnp.full((shape[0], 1, shape[2]), 2.0**-6, jnp.float32)
    how = HowToQuantize(qtype=jnp.float8_e4m3fn, channelwise_axes=(0, 2), calibration_method="absmax")
    return WithAux(QArray(qvalue=nnx.Param(value, out_sharding=sharding),
                          scale=nnx.Param(scale, out_sharding=sharding), qtype=jnp.float8_e4m3fn), how)


def use_fp8_weights(experts: nnx.Module, rngs: nnx.Rngs) -> None:
    """Give a routed-experts module (`mlp.Experts`) the checkpoint's FP8 form of its three weights."""
    for name in EXPERT_PROJECTIONS:
        param = getattr(experts, name)
        setattr(experts, name, fp8_expert_weight(rngs, tuple(param.shape), param.get_metadata("out_sharding", None)))


def scale_rows(w: np.ndarray) -> tuple[np.ndarray]:
    """A torch Linear's per-output-channel scale [out, 1] as one expert's row of ours, [1, out]."""
    return (w.reshape(-1, 1).T,)


# --------------------------------------------------------------------------------------------
# Routed experts under Qwix.

@dataclasses.dataclass(frozen=True)
class ExpertWeights:
    """One MoE layer's stacked expert weights [E, in, out] (arrays, or QArrays when quantized), and the
    Qwix rule's activation type for the expert inputs (None: unquantized)."""
    gate_proj: object
    up_proj: object
    down_proj: object
    act_rule: object | None = None


def expert_weights(module: nnx.Module) -> ExpertWeights:
    """The experts' weights as the step uses them; under a Qwix rule with a `weight_qtype` that matches
    this module (for einsums), quantized once, as Qwix quantizes the weight of an einsum
    `"TD,EDF->ETF"`: a scale per expert and output channel (and tiles of the input axis with `tile_size`)."""
    import qwix.pallas as qpl
    from qwix._src.core import einsum as qeinsum
    from qwix._src.providers import ptq

    rule = qpl.get_current_rule("einsum")  # None unless Qwix runs the model with a matching rule
    weights = {}
    for name in EXPERT_PROJECTIONS:
        node = getattr(module, name)
        if isinstance(node, ptq.WithAux):  # the checkpoint's FP8, or quantized by an earlier call
            weights[name] = node.value.array
        elif rule is not None and rule.weight_qtype is not None:
            how = qeinsum.get_how_to_quantize(einsum_str="TD,EDF->ETF", ndims=(2, 3), for_lhs=False,
                                              qtype=rule.weight_qtype, tile_size=rule.tile_size,
                                              calibration_method=rule.weight_calibration_method)
            weights[name] = ptq.create_quantized_param(name, node[...], how).array
        else:
            weights[name] = node[...]
    act_rule = rule if rule is not None and rule.weight_qtype is not None and rule.act_qtype is not None else None
    return ExpertWeights(**weights, act_rule=act_rule)


def expert_einsum(spec: str, x: jax.Array, w, act_rule=None) -> jax.Array:
    """`jnp.einsum(spec, x, w)` for an expert weight `w`, plain or quantized (then in Qwix's arithmetic,
    with `x` quantized per token where `act_rule` says so); the result in `x`'s dtype."""
    from qwix._src.core.qarray import QArray

    if not isinstance(w, QArray):
        return jnp.einsum(spec, x, w)
    return _quantized_einsum(spec, x, w, act_rule)


@disable_interceptions
def _quantized_einsum(spec, x, w, act_rule):
    # Run outside Qwix's interception (as Qwix's own quantized ops do): the weight is already quantized.
    from qwix._src.core import einsum as qeinsum
    from qwix._src.core import qarray

    lhs = x
    if act_rule is not None:
        how = qeinsum.get_how_to_quantize(einsum_str=spec, ndims=(x.ndim, w.ndim), for_lhs=True,
                                          qtype=act_rule.act_qtype, tile_size=act_rule.tile_size,
                                          calibration_method=act_rule.act_calibration_method)
        lhs = qarray.quantize(x, how)
    return qeinsum.einsum(spec, lhs, w).astype(x.dtype)


# --------------------------------------------------------------------------------------------
# Qwix rules: checked before the model loads and after it is quantized.

class QwixRuleError(ValueError):
    """A Qwix rule from --additional_config that jaxllm's models can't honour."""


def qwix_rules(vllm_config) -> list[dict] | None:
    quantization = (vllm_config.additional_config or {}).get("quantization")
    if not quantization:
        return None
    return (quantization.get("qwix") or {}).get("rules") or None


def check_qwix_config(vllm_config) -> None:
    """Refuse, before loading, what can't work: no weight_qtype, a qtype this host's XLA can't run,
    `use_abstract_model` (jaxllm quantizes the loaded model, as tpu-inference does by default)."""
    quantization = (vllm_config.additional_config or {}).get("quantization") or {}
    qwix = quantization.get("qwix") or {}
    if qwix.get("use_abstract_model"):
        raise QwixRuleError("--additional_config quantization.qwix.use_abstract_model=true: jaxllm's models "
                            "quantize the loaded weights (Qwix on the concrete model); remove use_abstract_model")
    for i, rule in enumerate(qwix.get("rules") or ()):
        where = f"Qwix rule #{i} {rule}"
        if not rule.get("weight_qtype"):
            raise QwixRuleError(f"{where} has no weight_qtype: Qwix's post-training quantization quantizes "
                                "activations only next to quantized weights, so this rule would quantize nothing")
        for key in ("weight_qtype", "act_qtype"):
            if rule.get(key) is not None:
                _probe_qtype(where, key, rule[key], rule.get("tile_size"))


@functools.cache
def _probe_qtype(where: str, key: str, qtype: str, tile_size) -> None:
    """Quantize, multiply and dequantize with `qtype` once on this host: an error here is a clear start-up
    error, where the same failure inside the model's first compile would not name the rule."""
    from qwix._src.core import einsum as qeinsum
    from qwix._src.core import qarray

    try:
        dtype = jnp.dtype(qtype)
    except TypeError:
        raise QwixRuleError(f"{where}: {key}={qtype!r} is not a dtype name") from None

    def probe(x, w):
        how_w = qeinsum.get_how_to_quantize(einsum_str="TD,DF->TF", ndims=(2, 2), for_lhs=False, qtype=dtype,
                                            tile_size=tile_size, calibration_method="absmax")
        lhs = x
        if key == "act_qtype":
            lhs = qarray.quantize(x, qeinsum.get_how_to_quantize(
                einsum_str="TD,DF->TF", ndims=(2, 2), for_lhs=True, qtype=dtype, tile_size=tile_size,
                calibration_method="absmax"))
        return qeinsum.einsum("TD,DF->TF", lhs, qarray.quantize(w, how_w))

    x = jnp.linspace(-1.0, 1.0, 8 * 256, dtype=jnp.float32).reshape(8, 256)
    w = jnp.linspace(-1.0, 1.0, 256 * 128, dtype=jnp.float32).reshape(256, 128)
    try:
        result = np.asarray(jax.jit(probe)(x, w))
    except Exception as error:  # XLA's message names the missing support
        raise QwixRuleError(f"{where}: {key}={qtype!r} can't run on this host's XLA backend "
                            f"({jax.default_backend()}): {type(error).__name__}: {str(error)[:300]}") from None
    if not np.isfinite(result).all():
        raise QwixRuleError(f"{where}: {key}={qtype!r} gives non-finite results on this host's XLA backend "
                            f"({jax.default_backend()})")


def quantized_weights(model: nnx.Module) -> set[tuple[str, str]]:
    """(module path, as Qwix names it ("layers/0/attn"), attribute) of every weight in Qwix's quantized form."""
    return {("/".join(map(str, path[:-3])), str(path[-3]))
            for path, _ in nnx.iter_graph(model) if len(path) >= 3 and tuple(path[-2:]) == ("array", "qvalue")}


def check_rules_quantized_something(model: nnx.Module, rules: Sequence[dict], before: set[tuple[str, str]]) -> None:
    """Every rule must have quantized a weight: a rule is used by a weight it was the first to match
    (Qwix applies the first rule whose module_path matches and whose op_names allow the op; our weights
    are read by einsums). `before`: weights already quantized (an FP8 checkpoint's), not Qwix's doing."""
    quantized = quantized_weights(model) - before
    used = set()
    for path, _ in quantized:
        for i, rule in enumerate(rules):
            ops = rule.get("op_names") or ()
            if isinstance(ops, str):
                ops = (ops,)
            if (not ops or "einsum" in ops) and re.fullmatch(rule.get("module_path", ".*"), path):
                used.add(i)
                break
    unused = [i for i in range(len(rules)) if i not in used]
    if unused:
        i = unused[0]
        paths = sorted({path for path, _ in quantized} | _weight_module_paths(model))
        raise QwixRuleError(
            f"Qwix rule #{i} {rules[i]} quantizes nothing in {type(model).__name__}: its module_path matches no "
            f"module with weights (or an earlier rule takes them; our weights are read by einsums). Module paths "
            f"are like {', '.join(paths[:6])}{' ...' if len(paths) > 6 else ''}")


def _weight_module_paths(model: nnx.Module) -> set[str]:
    paths = set()
    for path, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Param) and len(path) >= 2 and "array" not in path and len(node.shape) >= 2:
            paths.add("/".join(map(str, path[:-1])))
    return paths
