"""Rotary position embeddings, applied with the frequencies the config computed
(`jaxllm.model.config.rope_frequencies`, from transformers' own initialisers)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _angles(positions: jax.Array, inv_freq: tuple[float, ...]) -> jax.Array:
    return positions.astype(jnp.float32)[:, None] * jnp.asarray(inv_freq, jnp.float32)[None, :]  # [T, H/2]


def apply_rope_interleaved(x: jax.Array, positions: jax.Array, inv_freq, scaling: float = 1.0) -> jax.Array:
    """x [T, heads, H] with rotary pairs (x[2i], x[2i+1]), Llama 4's complex form."""
    angles = _angles(positions, inv_freq)[:, None, :]
    cos, sin = jnp.cos(angles) * scaling, jnp.sin(angles) * scaling
    pairs = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
    real, imag = pairs[..., 0], pairs[..., 1]
    rotated = jnp.stack([real * cos - imag * sin, real * sin + imag * cos], axis=-1)
    return rotated.reshape(x.shape).astype(x.dtype)


def apply_rope_split_half(x: jax.Array, positions: jax.Array, inv_freq, scaling: float = 1.0) -> jax.Array:
    """x [T, heads, H] with rotary pairs (x[i], x[i + H/2]), the Llama/Gemma "rotate_half" form."""
    angles = _angles(positions, inv_freq)
    angles = jnp.concatenate([angles, angles], axis=-1)[:, None, :]
    cos, sin = jnp.cos(angles) * scaling, jnp.sin(angles) * scaling
    xf = x.astype(jnp.float32)
    first, second = jnp.split(xf, 2, axis=-1)
    rotated_half = jnp.concatenate([-second, first], axis=-1)
    return (xf * cos + rotated_half * sin).astype(x.dtype)
