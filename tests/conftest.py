"""Test-wide JAX setup; runs before any test module imports jax.

Four simulated CPU devices let the sharding tests run a (1, 4) mesh on a CPU-only
host. XLA reads the flag when the backend initialises, so it must be set here, at
conftest import time, before anything imports jax.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count=4"
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_DEVICE_COUNT_FLAG}".strip()

# End-to-end tests start several engines; tpu-inference's warm-up compilation of every
# bucket would dominate their time, and jit compiles what the tests use anyway.
os.environ.setdefault("SKIP_JAX_PRECOMPILE", "1")

# Modules that start vLLM engines. vLLM forks the engine-core process, and a process
# whose XLA backend already runs threads cannot be forked safely (the child aborts),
# so these run first, before any in-process test initialises JAX's CPU backend.
ENGINE_MODULES = ("test_async_scheduling.py", "test_vllm_generate.py", "test_windowed_kv_cache.py",
                  "test_vllm_multimodal.py", "test_vllm_bf16.py", "test_quantized_generate.py")


def pytest_collection_modifyitems(session, config, items):
    items.sort(key=lambda item: item.path.name not in ENGINE_MODULES)
