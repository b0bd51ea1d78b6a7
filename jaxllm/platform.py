"""Where jaxllm runs: on a TPU, or on another JAX backend (CPU, GPU) through the host adaptations.

One answer for the whole package. The plugin needs it before JAX has a backend
(vLLM's API-server process must never initialise one: on a TPU VM it would take
the chips from the engine process), so it is read from the environment and the
device files, never from `jax.devices()`. The attention dispatch and the KV-cache
plan ask the same function, so the kernel and the cache layout always agree.
"""

from __future__ import annotations

import glob
import os


def on_tpu() -> bool:
    """Whether JAX will run on a TPU in this process, decided without initialising a JAX backend."""
    platforms = os.environ.get("JAX_PLATFORMS", "")
    if platforms:
        return "tpu" in platforms or "proxy" in platforms
    # v4 and v5p VMs expose /dev/accel*, v5e and v6e numbered /dev/vfio entries.
    if glob.glob("/dev/accel*"):
        return True
    try:
        return any(entry.isdigit() for entry in os.listdir("/dev/vfio"))
    except OSError:
        return False

