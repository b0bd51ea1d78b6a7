"""Pre-quantized checkpoints: which `quantization_config` jaxllm loads, read into a typed config.

Accepted: the format of Meta's Llama-4-Maverick-17B-128E-Instruct-FP8,
compressed-tensors' "float-quantized" FP8 with one static scale per output channel,
on the routed experts only (`...experts.{e}.{gate,up,down}_proj.weight` in
float8_e4m3fn and `.weight_scale` [out, 1]); `jaxllm.model.quantization` runs it.
Any other `quantization_config` is refused by name.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from jaxllm.model.errors import UnsupportedConfigError

# Where the accepted format is read: transformers' compressed-tensors integration
# (integrations/compressed_tensors.py, DecompressExperts: per-expert fp8 `weight` x `weight_scale`),
# vLLM's compressed-tensors W8A8 FP8 scheme (schemes/compressed_tensors_w8a8_fp8.py: channel
# strategy, scale [out, 1]) and tpu-inference's Llama 4 loader (models/jax/llama4.py,
# EXPERT_MAPPINGS_UNFUSED: experts.*.{gate,up,down}_proj.{weight,weight_scale}).
MAVERICK_FP8 = "compressed-tensors float-quantized FP8 (Llama 4 Maverick FP8's format)"
EXPERT_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class Fp8Experts:
    """Routed-expert weights stored as FP8 with one static scale per output channel.

    `activations` is what the checkpoint declares for the experts' inputs (Maverick:
    dynamic per-token FP8, which has no stored scales); jaxllm runs the experts on
    unquantized activations, as transformers' dequantized model does, unless a Qwix
    rule with `act_qtype` matches them.
    """
    weight_dtype: str       # "float8_e4m3fn"
    activations: str        # "unquantized" or "dynamic per-token float8" (declared, not emulated)
    ignore: tuple[str, ...]  # compressed-tensors' ignore list: names and "re:" patterns


def checkpoint_quantization(hf_config, family: str, module_names: "ModuleNames | None" = None) -> Fp8Experts | None:
    """The checkpoint's weight quantization: None (unquantized), Fp8Experts, or UnsupportedConfigError naming it.

    `module_names`: the model's torch Linear modules (for checking which ones the config
    quantizes); None refuses every quantization_config (a family with no accepted format).
    """
    config = _quantization_config(hf_config)
    if config is None:
        return None
    method = config.get("quant_method") if isinstance(config, dict) else getattr(config, "quant_method", config)
    hint = ("serve the bf16 release, or quantize at load time with Qwix rules in --additional_config "
            "'{\"quantization\": {\"qwix\": {\"rules\": [...]}}}'")
    if module_names is None:
        raise UnsupportedConfigError(f"quantization_config quant_method={method!r}: {family} checkpoints are "
                                     f"loaded unquantized (bf16 / fp32) only; {hint}")
    if method != "compressed-tensors" or not isinstance(config, dict):
        raise UnsupportedConfigError(f"quantization_config quant_method={method!r}: jaxllm's {family} loads "
                                     f"{MAVERICK_FP8} checkpoints and unquantized ones; {hint}")
    from compressed_tensors.quantization import QuantizationConfig

    try:
        parsed = QuantizationConfig.model_validate(config)
    except Exception as error:  # pydantic's ValidationError names the field
        raise UnsupportedConfigError(f"quantization_config (compressed-tensors) does not parse: {error}") from None
    _require_maverick_fp8(parsed)
    scheme = next(iter(parsed.config_groups.values()))
    ignore = tuple(parsed.ignore or ())
    quantized = [name for name in module_names.all() if _targeted(name, scheme.targets, ignore)]
    experts = module_names.routed_experts()
    others = [name for name in quantized if name not in experts]
    if others:
        raise UnsupportedConfigError(
            f"quantization_config ({MAVERICK_FP8}) quantizes {len(others)} module(s) that are not routed experts, "
            f"e.g. {others[0]!r}: jaxllm loads FP8 routed experts only (Maverick FP8 keeps attention, shared "
            "experts, routers and dense MLPs in bf16); add them to `ignore` or serve the bf16 release")
    missing = sorted(set(experts) - set(quantized))
    if missing:
        raise UnsupportedConfigError(
            f"quantization_config ({MAVERICK_FP8}) leaves {len(missing)} routed expert projection(s) unquantized, "
            f"e.g. {missing[0]!r}: jaxllm loads either every routed expert in FP8 or none")
    if not experts:
        raise UnsupportedConfigError(f"quantization_config ({MAVERICK_FP8}) on a model without MoE layers")
    inputs = scheme.input_activations
    return Fp8Experts(weight_dtype="float8_e4m3fn",
                      activations="unquantized" if inputs is None else "dynamic per-token float8",
                      ignore=ignore)


def _quantization_config(hf_config):
    for config in (hf_config, getattr(hf_config, "text_config", None)):
        quantization = getattr(config, "quantization_config", None) if config is not None else None
        if quantization:
            return quantization
    return None


def _require_maverick_fp8(parsed) -> None:
    """compressed-tensors float-quantized, one group on Linear modules: FP8 weights with static per-channel
    scales, inputs unquantized or dynamic per-token FP8, no KV-cache, output or sparsity scheme."""
    def refuse(what):
        raise UnsupportedConfigError(f"quantization_config (compressed-tensors) {what}: jaxllm loads "
                                     f"{MAVERICK_FP8} only (FP8 weights, one static scale per output channel)")

    if parsed.format != "float-quantized":
        refuse(f"format={parsed.format!r}")
    if str(getattr(parsed.quantization_status, "value", parsed.quantization_status)) != "compressed":
        refuse(f"quantization_status={parsed.quantization_status!r}")
    if parsed.kv_cache_scheme is not None:
        refuse("has a kv_cache_scheme (KV-cache scales); use --kv-cache-dtype fp8, whose scales are 1.0")
    if len(parsed.config_groups) != 1:
        refuse(f"has {len(parsed.config_groups)} config groups")
    (name, scheme), = parsed.config_groups.items()
    weights, inputs = scheme.weights, scheme.input_activations
    if list(scheme.targets) != ["Linear"]:
        refuse(f"group {name} targets {list(scheme.targets)}")
    if weights is None or not (weights.type == "float" and weights.num_bits == 8 and weights.symmetric
                               and not weights.dynamic and weights.strategy == "channel"):
        refuse(f"group {name} weights {weights!r}")
    if inputs is not None and not (inputs.type == "float" and inputs.num_bits == 8 and inputs.dynamic is True
                                   and inputs.strategy == "token"):
        refuse(f"group {name} input_activations {inputs!r}")
    if scheme.output_activations is not None:
        refuse(f"group {name} output_activations {scheme.output_activations!r}")


def _targeted(name: str, targets: Sequence[str], ignore: Sequence[str]) -> bool:
    """compressed-tensors' rule for a torch Linear module: a target matches (the class "Linear" or the name),
    and no ignore entry does (names, "re:" patterns)."""
    from compressed_tensors.utils.match import match_name

    return (any(target == "Linear" or match_name(name, target) for target in targets)
            and not any(match_name(name, entry) for entry in ignore))


@dataclasses.dataclass(frozen=True)
class ModuleNames:
    """The torch Linear modules of a Llama 4 text model, named as in its checkpoint."""
    prefix: str                   # "model." (text-only) or "language_model.model." (multimodal)
    lm_head: str
    num_layers: int
    moe_layers: frozenset[int]
    num_experts: int

    def routed_experts(self) -> list[str]:
        return [f"{self.prefix}layers.{i}.feed_forward.experts.{e}.{p}" for i in sorted(self.moe_layers)
                for e in range(self.num_experts) for p in EXPERT_PROJECTIONS]

    def all(self) -> list[str]:
        names = []
        for i in range(self.num_layers):
            layer = f"{self.prefix}layers.{i}."
            names += [layer + f"self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
            if i in self.moe_layers:
                names += [layer + "feed_forward.router"]
                names += [layer + f"feed_forward.shared_expert.{p}" for p in EXPERT_PROJECTIONS]
            else:
                names += [layer + f"feed_forward.{p}" for p in EXPERT_PROJECTIONS]
        return names + self.routed_experts() + [self.lm_head]
