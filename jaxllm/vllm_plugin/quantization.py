"""Qwix rules (`--additional_config '{"quantization": {"qwix": {"rules": [...]}}}'`) on jaxllm's models.

tpu-inference applies Qwix to any JAX model it loads (`qwix_utils.apply_qwix_quantization`,
on the loaded model) and that works for ours unchanged. Two of its steps are
patched, for jaxllm's models only:
- `update_vllm_config_for_qwix_quantization`: tpu-inference adds its own default rules
  for Llama 4 FP8 checkpoints (for its MoE module names, which ours don't have); our
  models load those checkpoints themselves (`jaxllm.model.checkpoint_quantization`),
  so no default is added. User rules are checked before anything loads
  (`jaxllm.model.quantization.check_qwix_config`): a weight_qtype on every rule, and
  qtypes this host's XLA runs;
- `apply_qwix_quantization`: once the model is quantized, a rule that quantized
  nothing (a module_path that matches none of our modules) is a start-up error
  rather than a silently unquantized model.
"""

from __future__ import annotations

import functools

from vllm.logger import init_logger

from jaxllm.vllm_plugin.patching import Patch, install

logger = init_logger("vllm.jaxllm")

_QWIX = "tpu_inference.models.jax.utils.qwix.qwix_utils"


def install_all() -> None:
    install(Patch(_QWIX, "update_vllm_config_for_qwix_quantization",
                  "for jaxllm's models: no default Qwix rules for FP8 checkpoints (loaded as stored); user rules "
                  "checked before loading (weight_qtype, qtypes this host runs)", _checking_rules_first))
    install(Patch(_QWIX, "apply_qwix_quantization",
                  "for jaxllm's models: a Qwix rule that quantized nothing is a start-up error", _checking_rules_used))


def _ours(vllm_config) -> bool:
    from jaxllm.vllm_plugin.models import our_class

    return our_class(vllm_config.model_config.hf_config) is not None


def _checking_rules_first(builtin):
    @functools.wraps(builtin)
    def update_vllm_config_for_qwix_quantization(vllm_config):
        if not _ours(vllm_config):
            return builtin(vllm_config)
        if not (vllm_config.additional_config or {}).get("quantization"):
            return None  # (the builtin would add its Llama 4 FP8 default here)
        builtin(vllm_config)  # reads a config file name into rules and parses them
        from jaxllm.model.quantization import check_qwix_config

        check_qwix_config(vllm_config)
        return None
    return update_vllm_config_for_qwix_quantization


def _checking_rules_used(builtin):
    @functools.wraps(builtin)
    def apply_qwix_quantization(vllm_config, model_or_model_fn, rng, mesh, apply_to_abstract_model):
        from jaxllm.model import quantization
        from jaxllm.model.causal_lm import CausalLM

        rules = quantization.qwix_rules(vllm_config)
        if not rules or apply_to_abstract_model or not isinstance(model_or_model_fn, CausalLM):
            return builtin(vllm_config, model_or_model_fn, rng, mesh, apply_to_abstract_model)
        before = quantization.quantized_weights(model_or_model_fn)  # an FP8 checkpoint's experts
        model = builtin(vllm_config, model_or_model_fn, rng, mesh, apply_to_abstract_model)
        quantization.check_rules_quantized_something(model, rules, before)
        logger.info("jaxllm: Qwix quantized %d weights of %s", len(quantization.quantized_weights(model)) - len(before),
                    type(model).__name__)
        return model
    return apply_qwix_quantization
