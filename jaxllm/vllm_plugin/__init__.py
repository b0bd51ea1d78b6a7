"""vLLM plugin entry point (`vllm.general_plugins`): makes tpu-inference serve jaxllm's models.

Everything jaxllm changes in tpu-inference is a named `Patch` (`patching.py`),
installed here and applied when its module is first imported;
`python -m jaxllm.vllm_plugin --explain` lists them. vLLM loads general plugins
in every process it starts (API server, engine core, workers), so `register()`
runs many times; every step of it is idempotent.
"""

from __future__ import annotations


def register() -> None:
    from jaxllm import platform
    from jaxllm.vllm_plugin import host, kv_cache, models, multimodal, quantization, runner_fixes

    if not platform.on_tpu():
        host.install_all()
    runner_fixes.install_all()
    models.install_all()
    kv_cache.install_all()
    multimodal.install_all()
    quantization.install_all()
