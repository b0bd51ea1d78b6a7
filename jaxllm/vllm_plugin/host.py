"""Make tpu-inference's runner work where JAX's backend is not a TPU (CPU, GPU).

vLLM picks tpu-inference's platform whenever `libtpu` imports, which it does on
any host where vllm-tpu is installed. Its JAX runner then works unchanged except
for five TPU assumptions, each replaced here from outside, without editing its files:

- XLA compile options: the step and the sampler are jitted with `xla_tpu_*`
  options that other backends reject, so they become `{}`;
- memory accounting: `hbm_usage_bytes` needs TPU `memory_stats()`; on a host the
  "device memory" is RAM, see `host_memory_usage`;
- the mesh: `make_optimized_mesh` sorts devices by TPU `.coords`, so a plain
  `Mesh` over the devices in order is built instead;
- attention: the Pallas RPA kernels are swapped for `jaxllm.attention`'s
  portable implementation, under tpu-inference's own `shard_map`;
- noise: log lines about GCE metadata and TPU device names are dropped.

None of this runs on a TPU host (see `tpu_present`).
"""

from __future__ import annotations

import glob
import logging
import os
import sys

import numpy as np
from vllm.logger import init_logger

logger = init_logger("vllm.jaxllm")

HOST_MEMORY_ENV = "JAXLLM_HOST_MEMORY_GB"

# Modules that bind the patched names with `from ... import ...` at import time.
_COMPILER_OPTION_USERS = (
    "tpu_inference.layers.jax.sample.sampling",
    "tpu_inference.models.common.model_loader",
    "tpu_inference.runner.decode_loop",
    "tpu_inference.models.vllm.vllm_model_wrapper",
)
_HARMLESS_NOISE = (
    "Unable to poll the TPU GCE Metadata",
    "Unable to poll TPU GCE Metadata",
    "Failed to detect number of TPUs",
    "Error occurred while logging TPU info",
    "Error getting device name",
)


def tpu_present() -> bool:
    """Whether JAX will run on a TPU here, decided without initialising a JAX backend.

    Initialising one in vLLM's API-server process would grab the TPU from the
    engine process, so this reads the environment and device files instead.
    """
    platforms = os.environ.get("JAX_PLATFORMS", "")
    if platforms:
        return "tpu" in platforms or "proxy" in platforms
    if glob.glob("/dev/accel*"):
        return True
    try:
        return any(entry.isdigit() for entry in os.listdir("/dev/vfio"))
    except OSError:
        return False


def adapt() -> None:
    """Apply every host adaptation; call once per process, before tpu-inference's runner is imported."""
    _quiet_known_noise()
    _drop_tpu_compiler_options()
    _account_host_memory()
    _build_plain_mesh()
    _use_portable_attention()
    logger.info("jaxllm: adapted tpu-inference to the %s host (portable attention, host memory budget)",
                os.environ.get("JAX_PLATFORMS") or "non-TPU")


def _set_everywhere(module_name: str, attr: str, value, importers=()) -> None:
    """Replace `module.attr`, and the same name in already imported modules that copied it."""
    module = sys.modules.get(module_name) or __import__(module_name, fromlist=[attr])
    original = getattr(module, attr)
    setattr(module, attr, value)
    for name in importers:
        importer = sys.modules.get(name)
        if importer is not None and getattr(importer, attr, None) is original:
            setattr(importer, attr, value)


def _no_compiler_options():
    return {}


def _drop_tpu_compiler_options() -> None:
    if "tpu_inference.layers.jax.sample.sampling" in sys.modules:
        # Its `sample` was jitted at import time with the TPU options baked in.
        logger.warning("jaxllm: tpu-inference's sampler was imported before the plugin registered; "
                       "its jit keeps TPU compile options and will fail on this host")
    module = "tpu_inference.models.common.compiler_options"
    for attr in ("get_step_fn_compiler_options", "get_sampling_compiler_options"):
        _set_everywhere(module, attr, _no_compiler_options, _COMPILER_OPTION_USERS)


def host_memory_usage(devices) -> list[tuple[int, int]]:
    """(bytes in use, byte limit) per device, for vLLM's `gpu_memory_utilization` to apply to RAM.

    The host's RAM is split evenly among its JAX devices. The limit is the RAM
    (or `JAXLLM_HOST_MEMORY_GB`), capped at what is free now plus what JAX already
    holds, so a budget never promises memory that other processes use. In use is
    what live JAX arrays (the weights) occupy. vLLM then gives the KV cache
    `limit * gpu_memory_utilization - in_use`.
    """
    import jax
    import psutil

    devices = list(devices)
    in_use = dict.fromkeys(devices, 0)
    seen = set()
    for array in jax.live_arrays():
        for shard in array.addressable_shards:
            buffer = shard.data
            if buffer.device in in_use and id(buffer) not in seen:
                seen.add(id(buffer))
                in_use[buffer.device] += buffer.nbytes
    memory = psutil.virtual_memory()
    configured = os.environ.get(HOST_MEMORY_ENV)
    total = int(float(configured) * 2**30) if configured else memory.total
    total = min(total, memory.available + sum(in_use.values()))
    per_device = total // len(jax.local_devices())
    return [(in_use[d], per_device) for d in devices]


def _account_host_memory() -> None:
    _set_everywhere("tpu_inference.utils", "hbm_usage_bytes", host_memory_usage)


def plain_mesh(axis_shapes, axis_names, *, devices=None):
    """`make_optimized_mesh` without TPU topology: the devices in order."""
    import jax

    devices = list(devices) if devices is not None else jax.devices()
    count = int(np.prod(axis_shapes))
    return jax.sharding.Mesh(np.array(devices[:count]).reshape(axis_shapes), tuple(axis_names))


def _build_plain_mesh() -> None:
    _set_everywhere("tpu_inference.utils", "make_optimized_mesh", plain_mesh,
                    ("tpu_inference.runner.tpu_runner",))


def _use_portable_attention() -> None:
    from jaxllm.attention.portable import ragged_paged_attention

    # sharded_ragged_paged_attention looks these names up at call time, inside its shard_map.
    module = "tpu_inference.layers.common.attention_interface"
    _set_everywhere(module, "ragged_paged_attention", ragged_paged_attention)
    _set_everywhere(module, "ragged_paged_attention_hd64", ragged_paged_attention)


class _DropHarmlessNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(text in message for text in _HARMLESS_NOISE)


def _quiet_known_noise() -> None:
    import warnings

    # The runner donates small index arrays that the CPU backend cannot reuse; nothing is lost.
    warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
    # tpu-inference logs through vLLM's "vllm" logger, whose handlers see every record.
    for handler in logging.getLogger("vllm").handlers:
        if not any(isinstance(f, _DropHarmlessNoise) for f in handler.filters):
            handler.addFilter(_DropHarmlessNoise())
