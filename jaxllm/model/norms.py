"""RMS norms, computed in fp32 like the reference models."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def rms_normalize(x: jax.Array, eps: float) -> jax.Array:
    """x * rsqrt(mean(x^2) + eps) over the last axis, in fp32, cast back to x's dtype."""
    xf = x.astype(jnp.float32)
    return (xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)).astype(x.dtype)


class RMSNorm(nnx.Module):
    """`x * rsqrt(mean x^2 + eps) * weight` (not Gemma 2/3's `1 + weight`)."""

    def __init__(self, dim: int, eps: float, dtype):
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((dim,), dtype), out_sharding=(None,))

    def __call__(self, x: jax.Array) -> jax.Array:
        # Normalised in fp32, cast back, then scaled: HF's order, which matters in bf16.
        return rms_normalize(x, self.eps) * self.weight[...].astype(x.dtype)


class RMSNormScaledInFP32(RMSNorm):
    """`x * rsqrt(mean x^2 + eps) * weight`, scaled in fp32 and only then cast back: Gemma 4's order."""

    def __call__(self, x: jax.Array) -> jax.Array:
        normed = rms_normalize(x.astype(jnp.float32), self.eps)
        return (normed * self.weight[...].astype(jnp.float32)).astype(x.dtype)
