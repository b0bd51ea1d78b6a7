"""Parameter creation: each weight with its mesh sharding beside it.

Weights are created random (vLLM's `load_format="dummy"`, and abstract shapes
under `nnx.eval_shape`) and overwritten by `jaxllm.model.weights` when a
checkpoint is loaded.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

INIT_STD = 0.02


def param(rngs: nnx.Rngs, shape: tuple[int, ...], dtype, sharding: tuple) -> nnx.Param:
    """A normally initialised weight, sharded over the mesh axes named in `sharding` (None: replicated)."""
    value = jax.random.normal(rngs.params(), shape, jnp.float32) * INIT_STD
    return nnx.Param(value.astype(dtype), out_sharding=sharding)


def ones(shape: tuple[int, ...], dtype) -> nnx.Param:
    return nnx.Param(jnp.ones(shape, dtype), out_sharding=(None,) * len(shape))
