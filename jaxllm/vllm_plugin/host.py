"""Make tpu-inference's runner work where JAX's backend is not a TPU (CPU, GPU).

vLLM picks tpu-inference's platform wherever `libtpu` imports, which it does on
any host where vllm-tpu is installed. Its JAX runner then works unchanged except
for the TPU assumptions patched below, each named with why. None of this is
installed on a TPU (`jaxllm.platform.on_tpu`).
"""

from __future__ import annotations

import functools
import logging
import os

import numpy as np
from vllm.logger import init_logger

from jaxllm.vllm_plugin.patching import Patch, install

logger = init_logger("vllm.jaxllm")

HOST_MEMORY_ENV = "JAXLLM_HOST_MEMORY_GB"

_HARMLESS_NOISE = (
    "Unable to poll the TPU GCE Metadata",
    "Unable to poll TPU GCE Metadata",
    "Failed to detect number of TPUs",
    "Error occurred while logging TPU info",
    "Error getting device name",
)
_SAMPLER = "tpu_inference.layers.jax.sample.sampling"


def patches() -> list[Patch]:
    from jaxllm.attention.portable import ragged_paged_attention

    compiler_options = "tpu_inference.models.common.compiler_options"
    runner = "tpu_inference.runner.tpu_runner"
    few_requests = ("pad a step's requests (logits, sampling) to a power of two from 2, not from 8: "
                    "on a CPU, 8 rows of LM head and sampler cost more than 2 (1 row of bf16 weights is worse)")
    attention = "tpu_inference.layers.common.attention_interface"
    no_options = "the step and sampler are jitted with xla_tpu_* options, which other backends reject"
    # sharded_ragged_paged_attention looks the kernels up at call time, inside its shard_map.
    return [
        Patch(compiler_options, "get_step_fn_compiler_options", no_options, lambda _: _no_compiler_options),
        Patch(compiler_options, "get_sampling_compiler_options", no_options, lambda _: _no_compiler_options),
        Patch(_SAMPLER, "sample", "the sampler jitted without the xla_tpu_* options it took when imported "
              "(whenever that was: before the plugin registered too)", _sample_without_compiler_options),
        Patch("tpu_inference.utils", "hbm_usage_bytes",
              "device memory is the host's RAM (TPU memory_stats() is missing)", lambda _: host_memory_usage),
        Patch("tpu_inference.utils", "make_optimized_mesh",
              "a plain mesh of the devices in order (CPU devices have no TPU .coords)", lambda _: plain_mesh),
        Patch("tpu_inference.utils", "device_array",
              "upload a copy: CPU device_put aliases the runner's host buffers (docs/async-scheduling.md)",
              _copy_numpy_inputs),
        Patch(attention, "ragged_paged_attention",
              "jaxllm's portable attention in place of the Pallas TPU kernel", lambda _: ragged_paged_attention),
        Patch(runner, "TPUModelRunner._init_inputs",
              "token buckets from 1 (fp32 models) or 2, not 16, unless MIN_TOKEN_BUCKET is set: on a CPU "
              "a batch-1 decode padded to 16 tokens runs 16 tokens of matmuls", _small_token_buckets),
        Patch("tpu_inference.runner.utils", "MIN_NUM_SEQS", few_requests, lambda _: MIN_ROWS),
        Patch(runner, "MIN_NUM_SEQS", few_requests, lambda _: MIN_ROWS),
        Patch(attention, "ragged_paged_attention_hd64",
              "jaxllm's portable attention in place of the Pallas TPU kernel (head size 64)",
              lambda _: ragged_paged_attention),
    ]


def install_all() -> None:
    """Install every host adaptation, whichever tpu-inference modules are imported already."""
    _quiet_known_noise()
    for patch in patches():
        install(patch)


def _no_compiler_options():
    return {}  # not None: decode_loop unpacks it with **


def _sample_without_compiler_options(sample):
    """tpu-inference's `sample`, jitted again from its Python function without compiler options.

    Its module jits it at import time with `get_sampling_compiler_options()`, so a process
    that imported the sampler before the plugin registered (a test collecting tpu-inference's
    runner, a script importing it first) keeps the TPU options, and the first step fails with
    "No such compile option". Same static arguments as tpu-inference's decorator.
    """
    import jax

    return jax.jit(sample.__wrapped__, static_argnames=["mesh", "allow_distributed_sampling"])


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


def plain_mesh(axis_shapes, axis_names, *, devices=None):
    """`make_optimized_mesh` without TPU topology: the devices in order."""
    import jax

    devices = list(devices) if devices is not None else jax.devices()
    count = int(np.prod(axis_shapes))
    return jax.sharding.Mesh(np.array(devices[:count]).reshape(axis_shapes), tuple(axis_names))


# Off TPU, the fewest rows the runner pads a step's tokens (fp32 models) and logits rows to. XLA's CPU
# backend has no bf16 matrix-vector product: a one-row product with bf16 weights converts the whole
# weight to fp32 first (tests/test_step_memory.py: 9.0 GiB of temporaries for 4.6 GiB of weights,
# 0.1 GiB from two rows). fp32 weights have one, so an fp32 model's decode of one request runs one token.
MIN_ROWS = 2


def _small_token_buckets(init_inputs):
    """`_init_inputs` with tpu-inference's `MIN_TOKEN_BUCKET` knob at 1 (fp32 models) or `MIN_ROWS`,
    unless the user set it.

    The runner pads each step's tokens to its smallest bucket at least as large, and its
    buckets start at MIN_TOKEN_BUCKET (16), which suits a TPU's tiles. Elsewhere a decode
    of one request would run 16 tokens through every matmul, 15 of them padding. The
    runner itself still raises the floor to what data parallelism and KV packing need
    (`next_power_of_2(dp_size * kv_packing)`).
    """
    @functools.wraps(init_inputs)
    def with_small_buckets(runner):
        if "MIN_TOKEN_BUCKET" in os.environ:
            return init_inputs(runner)
        from tpu_inference.utils import to_jax_dtype

        smallest = 1 if to_jax_dtype(runner.dtype) == np.float32 else MIN_ROWS
        os.environ["MIN_TOKEN_BUCKET"] = str(smallest)  # read once, by this method (tpu_inference.envs reads lazily)
        try:
            return init_inputs(runner)
        finally:
            del os.environ["MIN_TOKEN_BUCKET"]

    return with_small_buckets


def _copy_numpy_inputs(device_array):
    """`device_array` that uploads a private copy of each numpy input.

    On JAX's CPU backend `device_put` of 64-byte-aligned numpy memory is zero-copy
    (`may_alias=False` too), and the runner rewrites its host buffers for step N+1
    while step N may still wait to read them under async scheduling. A copy owned by
    the device array alone can't be rewritten. A TPU copies into HBM anyway.
    """
    import jax

    def own_copy(x):
        return np.array(x, copy=True) if isinstance(x, np.ndarray) else x

    @functools.wraps(device_array)
    def with_copies(mesh, *args, sharding=None, **kwargs):
        return device_array(mesh, *jax.tree_util.tree_map(own_copy, args), sharding=sharding, **kwargs)

    return with_copies


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
