"""Parameter creation: each weight with its mesh sharding beside it.

Weights are created random (vLLM's `load_format="dummy"`, and abstract shapes
under `nnx.eval_shape`) and overwritten by `jaxllm.model.weights` when a
checkpoint is loaded.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

INIT_STD = 0.02


def param(rngs: nnx.Rngs, shape: tuple[int, ...], dtype, sharding: tuple) -> nnx.Param:
    """A normally initialised weight, sharded over the mesh axes named in `sharding` (None: replicated)."""
    value = standard_normal(rngs.params(), shape) * INIT_STD
    return nnx.Param(value.astype(dtype), out_sharding=sharding)


def ones(shape: tuple[int, ...], dtype) -> nnx.Param:
    return nnx.Param(jnp.ones(shape, dtype), out_sharding=(None,) * len(shape))


def standard_normal(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """fp32 N(0, 1) values, each a function of its index and `key` alone (Box-Muller over a counter hash).

    Why not `jax.random.normal`: XLA's CPU backend does not fuse threefry, so drawing a
    value costs 16 bytes of temporaries (the jitted dummy init of a 4.5 GiB bf16 model
    needed 27.6 GiB), and its RngBitGenerator materialises 32-bit words per value. Here
    every value is elementwise arithmetic on iotas, which XLA fuses into the write of
    the weight itself: no temporaries, on any backend, and the same values under any
    sharding.
    """
    seed = jax.random.bits(key, (2,), jnp.uint32)
    h = jnp.broadcast_to(seed[0], shape)
    for axis in range(len(shape)):  # one index per axis: no 32-bit overflow of a flat index
        h = _mix(h ^ lax.broadcasted_iota(jnp.uint32, shape, axis))
    g = _mix(h ^ seed[1])
    u1 = 1.0 - (h >> 8).astype(jnp.float32) * 2.0 ** -24  # (0, 1]: 24 bits, what fp32 holds exactly
    u2 = (g >> 8).astype(jnp.float32) * 2.0 ** -24        # [0, 1)
    return jnp.sqrt(-2.0 * jnp.log(u1)) * jnp.cos(2.0 * jnp.pi * u2)


def _mix(x: jax.Array) -> jax.Array:
    """A 32-bit integer hash with full avalanche (the "lowbias32" xorshift-multiply finaliser)."""
    x = (x ^ (x >> 16)) * jnp.uint32(0x7FEB352D)
    x = (x ^ (x >> 15)) * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)
