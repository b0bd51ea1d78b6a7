"""vLLM plugin entry point (`vllm.general_plugins`): registers jaxllm with tpu-inference.

vLLM loads general plugins in every process it starts (API server, engine core,
workers), so `register()` runs many times and must be idempotent.
"""

from __future__ import annotations

_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    _registered = True

    from jaxllm.vllm_plugin import host, kv_cache, models, runner_fixes

    on_tpu = host.tpu_present()
    if not on_tpu:
        host.adapt()  # before anything imports tpu-inference's runner or model loader
    runner_fixes.apply(host_adaptations=not on_tpu)
    models.register_models()
    kv_cache.install()
