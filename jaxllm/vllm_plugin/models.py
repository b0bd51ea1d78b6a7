"""Registration of jaxllm's models with tpu-inference (and, through it, vLLM).

Our classes are registered under their own names (`JaxLlama4ForCausalLM`, ...),
which `--hf-overrides '{"architectures": ["JaxLlama4ForCausalLM"]}'` selects.
Plain checkpoints name tpu-inference's architectures (`Llama4ForCausalLM`, ...),
whose registry entries tpu-inference rewrites on every lookup; so the lookup
itself is wrapped to answer with ours, unless `JAXLLM_USE_BUILTIN_MODELS=1`.
"""

from __future__ import annotations

import os

from vllm.logger import init_logger

logger = init_logger("vllm.jaxllm")

USE_BUILTIN_ENV = "JAXLLM_USE_BUILTIN_MODELS"


def our_models() -> dict[str, type]:
    from jaxllm.model.gemma4 import JaxGemma4ForCausalLM, JaxGemma4ForConditionalGeneration
    from jaxllm.model.llama4 import JaxLlama4ForCausalLM, JaxLlama4ForConditionalGeneration

    return {
        "JaxLlama4ForCausalLM": JaxLlama4ForCausalLM,
        "JaxLlama4ForConditionalGeneration": JaxLlama4ForConditionalGeneration,
        "JaxGemma4ForCausalLM": JaxGemma4ForCausalLM,
        "JaxGemma4ForConditionalGeneration": JaxGemma4ForConditionalGeneration,
    }


# Plain checkpoint architecture -> our class name.
DEFAULT_FOR = {
    "Llama4ForCausalLM": "JaxLlama4ForCausalLM",
    "Llama4ForConditionalGeneration": "JaxLlama4ForConditionalGeneration",
    "Gemma4ForCausalLM": "JaxGemma4ForCausalLM",
    "Gemma4ForConditionalGeneration": "JaxGemma4ForConditionalGeneration",
}


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


def register_models() -> None:
    from tpu_inference.models.common import model_loader

    models = our_models()
    for name, cls in models.items():
        model_loader.register_model(name, cls)

    builtin_lookup = model_loader._get_model_architecture
    if getattr(builtin_lookup, "jaxllm_lookup", False):
        return

    def lookup(config):
        ours = our_class(config)
        if ours is not None:
            logger.info("jaxllm: serving %s with jaxllm's %s", config.architectures, ours.__name__)
            return ours
        cls = builtin_lookup(config)
        logger.info("jaxllm: %s is served by tpu-inference's %s", config.architectures, cls.__name__)
        return cls

    lookup.jaxllm_lookup = True
    model_loader._get_model_architecture = lookup
