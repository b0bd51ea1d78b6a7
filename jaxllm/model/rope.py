"""Rotary position embeddings.

Frequencies come from transformers' own RoPE initialisers (llama3 scaling,
Gemma 4's proportional RoPE, ...), computed once from the HF config, so every
`rope_type` means exactly what it means there.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


# Types whose frequencies don't depend on the sequence length. "dynamic" and
# "longrope" rescale with the current length, which one static table can't express.
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn", "proportional")


def rope_frequencies(hf_text_config, layer_type: str | None = None) -> tuple[tuple[float, ...], float]:
    """(inverse frequencies, cos/sin scaling) of the config's RoPE, as plain Python constants."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from jaxllm.model.config import UnsupportedConfigError

    params = hf_text_config.rope_parameters
    if layer_type is not None:
        params = params[layer_type]
    rope_type = params.get("rope_type", "default")
    if rope_type not in STATIC_ROPE_TYPES:
        raise UnsupportedConfigError(f"rope_parameters rope_type={rope_type!r} is not supported "
                                     f"(supported: {', '.join(STATIC_ROPE_TYPES)})")
    if rope_type == "default":
        head_dim = hf_text_config.head_dim
        inv_freq = 1.0 / (params["rope_theta"] ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
        return tuple(float(f) for f in inv_freq.astype(np.float32)), 1.0
    kwargs = {"layer_type": layer_type} if layer_type is not None else {}
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](hf_text_config, **kwargs)
    return tuple(float(f) for f in inv_freq.float().numpy()), float(scaling)


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
