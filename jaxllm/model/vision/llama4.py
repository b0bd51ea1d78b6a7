"""Llama 4 image encoder: vision model over image tiles, pixel-shuffle adapter, and the projector into the text model.

Semantics follow transformers' `models/llama4/modeling_llama4.py` (`Llama4VisionModel`,
`Llama4MultiModalProjector`, `Llama4ForConditionalGeneration.forward`):
- input: the image processor's tiles, `image_size` square, each image's tiles in row-major
  order followed, when there are several, by a global tile (the whole image resized);
- patch embedding: each tile cut into `patch_size` squares (torch's `Unfold`: channel, row,
  column within the patch), a linear map, a class embedding appended *after* the patches, a
  learned position embedding per token, then a layer norm;
- encoder layers: pre-norm (LayerNorm with bias) attention with biases, no mask, scale
  head_dim^-0.5, and 2-D RoPE in the complex, interleaved-pair form: the first half of the
  pairs rotates by (column + 1), the second half by (row + 1), the class token not at all;
  then a pre-norm GELU (erf) MLP with biases;
- a layer norm, the class token dropped, pixel shuffle (each 2 x 2 block of patches, for ratio
  0.5, becomes one token of 4x the channels), the adapter MLP (GELU after both layers), and the
  projector into the text hidden size.
transformers ignores `hidden_act` (always erf GELU), `norm_eps` (layer norms use 1e-5) and
`multi_modal_projector_bias` (no bias); so does this module. Each tile gives
(image_size / patch_size)^2 * ratio^2 tokens, one per `<|patch|>` placeholder of its tile.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from tpu_inference.layers.common.sharding import ShardingAxisName as Axis

from jaxllm.model.causal_lm import CausalLM
from jaxllm.model.config import text_config
from jaxllm.model.errors import require
from jaxllm.model.params import param
from jaxllm.model.vision.common import host_array
from jaxllm.model.weights import Rule, heads_in, heads_out, transpose

# torch's nn.LayerNorm default, which transformers' Llama 4 vision model uses whatever `norm_eps` says.
LAYER_NORM_EPS = 1e-5


@dataclasses.dataclass(frozen=True)
class Llama4VisionConfig:
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_channels: int
    image_size: int             # the tile size
    patch_size: int
    rope_theta: float
    pixel_shuffle_ratio: float
    projector_input_dim: int
    projector_output_dim: int
    vision_output_dim: int
    text_hidden_size: int

    @classmethod
    def from_hf(cls, hf_config) -> "Llama4VisionConfig":
        v = getattr(hf_config, "vision_config", None)
        require(v is not None, "Llama 4 config has no vision_config: the checkpoint has no vision model")
        for field in ("image_size", "patch_size"):
            require(isinstance(getattr(v, field), int),
                     f"Llama 4 vision {field}={getattr(v, field)!r}: only square sizes (an int) are supported")
        rope = v.rope_parameters or {}
        require(rope.get("rope_type", "default") == "default",
                 f"Llama 4 vision rope_parameters rope_type={rope.get('rope_type')!r}: only 'default' is supported")
        side = v.image_size // v.patch_size
        ratio = v.pixel_shuffle_ratio
        require(v.image_size % v.patch_size == 0,
                 f"Llama 4 vision image_size={v.image_size} is not a multiple of patch_size={v.patch_size}")
        require(v.hidden_size % v.num_attention_heads == 0 and (v.hidden_size // v.num_attention_heads) % 4 == 0,
                 f"Llama 4 vision head dim {v.hidden_size}/{v.num_attention_heads}: must be a multiple of 4 "
                 "for 2-D RoPE")
        require(float(side * ratio).is_integer() and float(v.hidden_size / ratio ** 2).is_integer(),
                 f"Llama 4 vision pixel_shuffle_ratio={ratio} does not divide {side}x{side} patches of "
                 f"{v.hidden_size} channels")
        # The adapter's shapes, as transformers builds them: fc1 reads the shuffled patches, fc2 is
        # square, and the projector reads the adapter's output.
        require(v.intermediate_size == round(v.hidden_size / ratio ** 2),
                 f"Llama 4 vision intermediate_size={v.intermediate_size}: the adapter reads pixel-shuffled "
                 f"patches of hidden_size / pixel_shuffle_ratio**2 = {round(v.hidden_size / ratio ** 2)}")
        require(v.projector_input_dim == v.projector_output_dim == v.vision_output_dim,
                 f"Llama 4 vision projector_input_dim={v.projector_input_dim}, projector_output_dim="
                 f"{v.projector_output_dim} and vision_output_dim={v.vision_output_dim} must be equal")
        return cls(
            hidden_size=v.hidden_size,
            intermediate_size=v.intermediate_size,
            num_layers=v.num_hidden_layers,
            num_heads=v.num_attention_heads,
            num_channels=v.num_channels,
            image_size=v.image_size,
            patch_size=v.patch_size,
            rope_theta=float(rope["rope_theta"]),
            pixel_shuffle_ratio=float(ratio),
            projector_input_dim=v.projector_input_dim,
            projector_output_dim=v.projector_output_dim,
            vision_output_dim=v.vision_output_dim,
            text_hidden_size=text_config(hf_config).hidden_size,
        )

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def tokens_per_tile(self) -> int:
        return round(self.patches_per_side ** 2 * self.pixel_shuffle_ratio ** 2)

    def rope_angles(self) -> np.ndarray:
        """[patches + 1, head_dim / 2] rotation angle of each rotary pair of each token (class token last)."""
        side, quarter = self.patches_per_side, self.hidden_size // self.num_heads // 4
        freq = 1.0 / self.rope_theta ** (np.arange(0, 2 * quarter, 2, dtype=np.float32) / np.float32(2 * quarter))
        index = np.arange(side * side)
        column, row = index % side, index // side
        angles = np.concatenate([(column + 1)[:, None] * freq, (row + 1)[:, None] * freq], axis=-1)
        return np.concatenate([angles, np.zeros((1, 2 * quarter))], axis=0).astype(np.float32)


class LayerNorm(nnx.Module):
    """torch's LayerNorm (statistics in fp32), weight and bias."""

    def __init__(self, dim: int, dtype):
        self.weight = nnx.Param(jnp.ones((dim,), dtype), out_sharding=(None,))
        self.bias = nnx.Param(jnp.zeros((dim,), dtype), out_sharding=(None,))

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        mean = jnp.mean(xf, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
        normed = (xf - mean) * jax.lax.rsqrt(var + LAYER_NORM_EPS)
        return (normed * self.weight[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(x.dtype)


def rotate_pairs(x: jax.Array, angles: jax.Array) -> jax.Array:
    """x [T, S, heads, H] with rotary pairs (x[2i], x[2i+1]), each rotated by angles [S, H/2], in fp32."""
    pairs = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
    cos, sin = jnp.cos(angles)[:, None, :], jnp.sin(angles)[:, None, :]
    real, imag = pairs[..., 0], pairs[..., 1]
    rotated = jnp.stack([real * cos - imag * sin, real * sin + imag * cos], axis=-1)
    return rotated.reshape(x.shape).astype(x.dtype)


class Llama4VisionAttention(nnx.Module):
    def __init__(self, config: Llama4VisionConfig, mesh: Mesh, dtype, rngs: nnx.Rngs):
        d, n = config.hidden_size, config.num_heads
        h = d // n
        self.head_dim = h
        heads = CausalLM.kv_head_sharding(n, mesh)  # over the tensor axis where they divide evenly
        self.q_proj = param(rngs, (d, n, h), dtype, (None, heads, None))
        self.k_proj = param(rngs, (d, n, h), dtype, (None, heads, None))
        self.v_proj = param(rngs, (d, n, h), dtype, (None, heads, None))
        self.q_bias = param(rngs, (n, h), dtype, (heads, None))
        self.k_bias = param(rngs, (n, h), dtype, (heads, None))
        self.v_bias = param(rngs, (n, h), dtype, (heads, None))
        self.o_proj = param(rngs, (n, h, d), dtype, (heads, None, None))
        self.o_bias = param(rngs, (d,), dtype, (None,))

    def __call__(self, x: jax.Array, angles: jax.Array) -> jax.Array:
        q = jnp.einsum("TSD,DNH->TSNH", x, self.q_proj[...]) + self.q_bias[...]
        k = jnp.einsum("TSD,DNH->TSNH", x, self.k_proj[...]) + self.k_bias[...]
        v = jnp.einsum("TSD,DNH->TSNH", x, self.v_proj[...]) + self.v_bias[...]
        q, k = rotate_pairs(q, angles), rotate_pairs(k, angles)
        scores = jnp.einsum("TQNH,TKNH->TNQK", q, k).astype(jnp.float32) * self.head_dim ** -0.5
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)  # every token sees the whole tile
        out = jnp.einsum("TNQK,TKNH->TQNH", probs, v)
        return jnp.einsum("TSNH,NHD->TSD", out, self.o_proj[...]) + self.o_bias[...]


class Llama4VisionMLP(nnx.Module):
    def __init__(self, config: Llama4VisionConfig, dtype, rngs: nnx.Rngs):
        d, f = config.hidden_size, config.intermediate_size
        self.fc1 = param(rngs, (d, f), dtype, (None, Axis.MLP_TENSOR))
        self.fc1_bias = param(rngs, (f,), dtype, (Axis.MLP_TENSOR,))
        self.fc2 = param(rngs, (f, d), dtype, (Axis.MLP_TENSOR, None))
        self.fc2_bias = param(rngs, (d,), dtype, (None,))

    def __call__(self, x: jax.Array) -> jax.Array:
        hidden = jax.nn.gelu(jnp.einsum("TSD,DF->TSF", x, self.fc1[...]) + self.fc1_bias[...], approximate=False)
        return jnp.einsum("TSF,FD->TSD", hidden, self.fc2[...]) + self.fc2_bias[...]


class Llama4VisionLayer(nnx.Module):
    def __init__(self, config: Llama4VisionConfig, mesh: Mesh, dtype, rngs: nnx.Rngs):
        self.input_layernorm = LayerNorm(config.hidden_size, dtype)
        self.attn = Llama4VisionAttention(config, mesh, dtype, rngs)
        self.post_attention_layernorm = LayerNorm(config.hidden_size, dtype)
        self.mlp = Llama4VisionMLP(config, dtype, rngs)

    def __call__(self, x: jax.Array, angles: jax.Array) -> jax.Array:
        x = x + self.attn(self.input_layernorm(x), angles)
        return x + self.mlp(self.post_attention_layernorm(x))


def unfold_patches(pixels: jax.Array, patch: int) -> jax.Array:
    """[T, C, S, S] -> [T, (S / patch)^2, C * patch^2]: patches row-major, each flattened (channel, row, column)."""
    t, c, s, _ = pixels.shape
    n = s // patch
    blocks = pixels.reshape(t, c, n, patch, n, patch).transpose(0, 2, 4, 1, 3, 5)
    return blocks.reshape(t, n * n, c * patch * patch)


def pixel_shuffle(x: jax.Array, ratio: float) -> jax.Array:
    """[T, n*n, C] -> [T, (n*ratio)^2, C / ratio^2]: transformers' reshapes, so channels line up with its adapter."""
    t, num, c = x.shape
    n = round(num ** 0.5)
    x = x.reshape(t, n, round(n * ratio), round(c / ratio))        # merge along the row
    x = x.transpose(0, 2, 1, 3)
    x = x.reshape(t, round(n * ratio), round(n * ratio), round(c / ratio ** 2))  # then along the column
    x = x.transpose(0, 2, 1, 3)
    return x.reshape(t, -1, x.shape[-1])


class Llama4ImageEncoder(nnx.Module):
    """Llama 4's vision model (`vision_model`) and projector (`multi_modal_projector`)."""

    config_class = Llama4VisionConfig

    # Standalone loading with `load_checkpoint`: every tensor outside the vision part is skipped.
    checkpoint_prefixes: tuple[str, ...] = ()
    skipped_prefixes = ("language_model.",)

    def __init__(self, config: Llama4VisionConfig, dtype, mesh: Mesh, rngs: nnx.Rngs):
        self.config = config
        d, p = config.hidden_size, config.patch_size
        self.patch_embedding = param(rngs, (config.num_channels * p * p, d), dtype, (None, None))
        self.class_embedding = param(rngs, (d,), dtype, (None,))
        self.positional_embedding = param(rngs, (config.patches_per_side ** 2 + 1, d), dtype, (None, None))
        self.layernorm_pre = LayerNorm(d, dtype)
        self.layers = nnx.List([Llama4VisionLayer(config, mesh, dtype, rngs) for _ in range(config.num_layers)])
        self.layernorm_post = LayerNorm(d, dtype)
        self.adapter_fc1 = param(rngs, (config.intermediate_size, config.projector_input_dim), dtype,
                                 (None, Axis.MLP_TENSOR))
        self.adapter_fc2 = param(rngs, (config.projector_output_dim, config.projector_output_dim), dtype,
                                 (Axis.MLP_TENSOR, None))
        self.projector = param(rngs, (config.vision_output_dim, config.text_hidden_size), dtype,
                               (Axis.MLP_TENSOR, None))

    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        """[tiles, C, S, S] -> [tiles, tokens_per_tile, text_hidden]. Jittable."""
        c = self.config
        patches = unfold_patches(pixel_values.astype(self.patch_embedding.dtype), c.patch_size)
        h = jnp.einsum("TPC,CD->TPD", patches, self.patch_embedding[...])
        cls = jnp.broadcast_to(self.class_embedding[...], (h.shape[0], 1, h.shape[-1]))
        h = jnp.concatenate([h, cls], axis=1) + self.positional_embedding[...]
        h = self.layernorm_pre(h)
        angles = jnp.asarray(c.rope_angles())
        for layer in self.layers:
            h = layer(h, angles)
        h = self.layernorm_post(h)[:, :-1]  # the class token only informs the patches
        shuffled = pixel_shuffle(h, c.pixel_shuffle_ratio)
        adapted = jax.nn.gelu(jnp.einsum("TSC,CP->TSP", shuffled, self.adapter_fc1[...]), approximate=False)
        adapted = jax.nn.gelu(jnp.einsum("TSP,PQ->TSQ", adapted, self.adapter_fc2[...]), approximate=False)
        return jnp.einsum("TSQ,QE->TSE", adapted, self.projector[...])

    def encode_images(self, pixel_values, patches_per_image, aspect_ratios=None, **unused) -> list[jax.Array]:
        """The features of each image, as `embed_multimodal(**kwargs)` must return them.

        Args (exactly what vLLM's `Mllama4MultiModalProcessor` produces, batched by the runner;
        CPU torch tensors, numpy or jax arrays):
          pixel_values: [total_tiles, num_channels, image_size, image_size] float (the model dtype:
            vLLM casts the processor's bf16 to it; any float dtype works), normalised pixels; the
            tiles of all images back to back, each image's local tiles in row-major order, then
            its global tile when it has more than one tile.
          patches_per_image: [num_images] int, how many of those tiles each image has
            (1, or ratio_h * ratio_w + 1).
          aspect_ratios: [num_images, 2] int (ratio_h, ratio_w) tiles per image; only checked
            against patches_per_image.
        Returns: a list of num_images arrays in the model's dtype, image i of shape
          [patches_per_image[i] * tokens_per_tile, text_hidden_size] (tokens_per_tile =
          (image_size / patch_size)**2 * pixel_shuffle_ratio**2, 4 for the tiny checkpoints, 144
          for Scout and Maverick): one row per `<|patch|>` placeholder of that image, tile by
          tile, in prompt order.
        """
        tiles_per_image = host_array(patches_per_image).astype(np.int64).reshape(-1)
        if aspect_ratios is not None:
            ratios = host_array(aspect_ratios).reshape(-1, 2)
            expected = np.where(ratios.prod(-1) == 1, 1, ratios.prod(-1) + 1)
            if not np.array_equal(expected, tiles_per_image):
                raise ValueError(f"Llama 4 patches_per_image {tiles_per_image.tolist()} do not match "
                                 f"aspect_ratios {ratios.tolist()}")
        pixels = host_array(pixel_values)
        if pixels.shape[0] != tiles_per_image.sum():
            raise ValueError(f"Llama 4 pixel_values has {pixels.shape[0]} tiles, patches_per_image "
                             f"{tiles_per_image.tolist()} sum to {tiles_per_image.sum()}")
        # One tile per call (tiles are encoded independently): one shape, compiled once (at warm-up).
        features = [_encode(self, jnp.asarray(pixels[t:t + 1]))[0] for t in range(pixels.shape[0])]
        starts = np.concatenate([[0], np.cumsum(tiles_per_image)])
        return [jnp.concatenate(features[a:b]) for a, b in zip(starts[:-1], starts[1:])]

    def warmup_inputs(self) -> dict:
        """`encode_images` arguments of one one-tile image, for the runner's warm-up."""
        c = self.config
        return dict(pixel_values=np.zeros((1, c.num_channels, c.image_size, c.image_size), np.float32),
                    patches_per_image=np.ones(1, np.int64))

    def checkpoint_rules(self) -> list[Rule]:
        n = self.config.num_heads
        model, layer = r"vision_model\.", r"vision_model\.model\.layers\.(\d+)\."
        attn = layer + r"self_attn\."
        return [
            Rule(model + r"patch_embedding\.linear\.weight", ("patch_embedding",), transpose),
            Rule(model + r"class_embedding", ("class_embedding",)),
            Rule(model + r"positional_embedding_vlm", ("positional_embedding",)),
            Rule(model + r"(layernorm_pre|layernorm_post)\.(weight|bias)", ("{0}.{1}",)),
            Rule(layer + r"(input_layernorm|post_attention_layernorm)\.(weight|bias)", ("layers.{0}.{1}.{2}",)),
            Rule(attn + r"(q|k|v)_proj\.weight", ("layers.{0}.attn.{1}_proj",), heads_in(n)),
            Rule(attn + r"(q|k|v)_proj\.bias", ("layers.{0}.attn.{1}_bias",), lambda w: (w.reshape(n, -1),)),
            Rule(attn + r"o_proj\.weight", ("layers.{0}.attn.o_proj",), heads_out(n)),
            Rule(attn + r"o_proj\.bias", ("layers.{0}.attn.o_bias",)),
            Rule(layer + r"mlp\.(fc1|fc2)\.weight", ("layers.{0}.mlp.{1}",), transpose),
            Rule(layer + r"mlp\.(fc1|fc2)\.bias", ("layers.{0}.mlp.{1}_bias",)),
            Rule(model + r"vision_adapter\.mlp\.(fc1|fc2)\.weight", ("adapter_{0}",), transpose),
            Rule(r"multi_modal_projector\.linear_1\.weight", ("projector",), transpose),
        ]


@nnx.jit
def _encode(encoder: Llama4ImageEncoder, pixel_values: jax.Array) -> jax.Array:
    return encoder(pixel_values)
