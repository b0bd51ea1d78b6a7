"""Which model serves a checkpoint: jaxllm's for Llama 4 and Gemma 4, tpu-inference's for the rest.

Our classes are registered under their own names (`JaxLlama4ForCausalLM`, ...),
which `--hf-overrides '{"architectures": ["JaxLlama4ForCausalLM"]}'` selects.
Plain checkpoints name tpu-inference's architectures (`Llama4ForCausalLM`, ...),
whose registry entries tpu-inference rewrites on every lookup; so the lookup
itself answers with ours, unless `JAXLLM_USE_BUILTIN_MODELS=1`.
"""

from __future__ import annotations

import functools
import os

from vllm.logger import init_logger

from jaxllm.vllm_plugin.patching import Patch, install

logger = init_logger("vllm.jaxllm")

USE_BUILTIN_ENV = "JAXLLM_USE_BUILTIN_MODELS"

# Plain checkpoint architecture -> our class name.
DEFAULT_FOR = {
    "Llama4ForCausalLM": "JaxLlama4ForCausalLM",
    "Llama4ForConditionalGeneration": "JaxLlama4ForConditionalGeneration",
    "Gemma4ForCausalLM": "JaxGemma4ForCausalLM",
    "Gemma4ForConditionalGeneration": "JaxGemma4ForConditionalGeneration",
}


def our_models() -> dict[str, type]:
    from jaxllm.model.gemma4 import JaxGemma4ForCausalLM, JaxGemma4ForConditionalGeneration
    from jaxllm.model.llama4 import JaxLlama4ForCausalLM, JaxLlama4ForConditionalGeneration

    return {cls.__name__: cls for cls in (JaxLlama4ForCausalLM, JaxLlama4ForConditionalGeneration,
                                          JaxGemma4ForCausalLM, JaxGemma4ForConditionalGeneration)}


def use_builtin_models() -> bool:
    return os.environ.get(USE_BUILTIN_ENV, "0").lower() in ("1", "true", "yes")


def our_class(hf_config) -> type | None:
    """The jaxllm class that serves this config's architecture, or None (tpu-inference's, or opted out)."""
    models = our_models()
    for arch in getattr(hf_config, "architectures", None) or []:
        if arch in models:
            return models[arch]
        if arch in DEFAULT_FOR and not use_builtin_models():
            return models[DEFAULT_FOR[arch]]
    return None


def install_all() -> None:
    """Register our class names with tpu-inference (and vLLM), and answer plain architectures with ours."""
    from tpu_inference.models.common import model_loader
    from vllm.model_executor.models.registry import ModelRegistry

    for name, cls in our_models().items():
        if name not in ModelRegistry.get_supported_archs():
            model_loader.register_model(name, cls)
    install(Patch("tpu_inference.models.common.model_loader", "_get_model_architecture",
                  "answer Llama 4 / Gemma 4 architectures with jaxllm's classes (JAXLLM_USE_BUILTIN_MODELS=1: not)",
                  _preferring_ours))


def _preferring_ours(builtin_lookup):
    @functools.wraps(builtin_lookup)
    def lookup(config):
        ours = our_class(config)
        if ours is not None:
            logger.info("jaxllm: serving %s with jaxllm's %s", config.architectures, ours.__name__)
            return ours
        cls = builtin_lookup(config)
        logger.info("jaxllm: %s is served by tpu-inference's %s", config.architectures, cls.__name__)
        return cls
    return lookup
