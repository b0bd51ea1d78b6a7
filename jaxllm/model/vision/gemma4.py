"""Gemma 4 image encoder: vision tower, pooling to soft tokens, and the projection into the text model.

Semantics follow transformers' `models/gemma4/modeling_gemma4.py` (`Gemma4VisionModel`,
`Gemma4MultimodalEmbedder`, `Gemma4Model.get_image_features`):
- input: the image processor's patches, `max_patches` per image (the image's patches in
  row-major order, then zero padding), with each patch's (x, y) in patch units, (-1, -1) on padding;
- patch embedding: pixels in [0, 1] mapped to [-1, 1], a linear map, plus factorized 2-D position
  embeddings (a learned row for x plus one for y; none on padding);
- encoder layers: Gemma's sandwich norms (`h + post_norm(block(pre_norm(h)))` around attention
  and MLP); attention over the image's patches only (padding is never a key), per-head RMS norms
  of q and k (with weights) and of v (without), scale 1.0, and 2-D RoPE: the first half of each
  head rotates with x, the second with y, each half in the split-half form;
- pooling: the patches of each `k x k` block (k = `pooling_kernel_size`) averaged into one soft
  token, in row-major block order, padding patches zeroed first; then times sqrt(hidden) in fp32
  and, with `standardize`, `(h - std_bias) * std_scale`;
- embedder: a weightless RMS norm, then a linear map into the text hidden size.
Every soft token is one `<|image|>` placeholder of the prompt; there are
(image patches) / k^2 of them, which is how many vLLM's processor inserts for the image.
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
from jaxllm.model.mlp import ACTIVATIONS
from jaxllm.model.norms import RMSNormScaledInFP32, rms_normalize
from jaxllm.model.params import param
from jaxllm.model.vision.common import host_array
from jaxllm.model.weights import Rule, heads_in, heads_out, transpose


@dataclasses.dataclass(frozen=True)
class Gemma4VisionConfig:
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_activation: str
    rms_norm_eps: float
    patch_size: int
    pooling_kernel_size: int
    position_embedding_size: int
    rope_theta: float
    standardize: bool           # (h - std_bias) * std_scale after pooling
    use_clipped_linears: bool   # every encoder projection clamps its input and output to stored bounds
    text_hidden_size: int
    max_soft_tokens: int | None  # `default_output_length` (read by vLLM): soft tokens of the processor's images

    @classmethod
    def from_hf(cls, hf_config) -> "Gemma4VisionConfig":
        v = getattr(hf_config, "vision_config", None)
        require(v is not None, "Gemma 4 config has no vision_config: the checkpoint has no vision tower")
        require(not v.attention_bias, "Gemma 4 vision attention_bias=True is not supported")
        rope = v.rope_parameters or {}
        require(rope.get("rope_type", "axial") == "axial",
                 f"Gemma 4 vision rope_parameters rope_type={rope.get('rope_type')!r}: only 'axial' is supported")
        require(v.hidden_activation in ACTIVATIONS,
                 f"Gemma 4 vision hidden_activation={v.hidden_activation!r}: supported are {sorted(ACTIVATIONS)}")
        # Two axes, each rotating split-half pairs: a quarter of the head per (axis, half).
        require(v.head_dim % 4 == 0, f"Gemma 4 vision head_dim={v.head_dim}: must be a multiple of 4 for 2-D RoPE")
        # With no pooling transformers returns its padding mask inverted (it keeps the padding).
        require(v.pooling_kernel_size > 1,
                 f"Gemma 4 vision pooling_kernel_size={v.pooling_kernel_size}: only pooling (> 1) is supported")
        require(v.num_attention_heads % v.num_key_value_heads == 0,
                 f"Gemma 4 vision num_attention_heads={v.num_attention_heads} is not a multiple of "
                 f"num_key_value_heads={v.num_key_value_heads}")
        return cls(
            hidden_size=v.hidden_size,
            intermediate_size=v.intermediate_size,
            num_layers=v.num_hidden_layers,
            num_heads=v.num_attention_heads,
            num_kv_heads=v.num_key_value_heads,
            head_dim=v.head_dim,
            hidden_activation=v.hidden_activation,
            rms_norm_eps=v.rms_norm_eps,
            patch_size=v.patch_size,
            pooling_kernel_size=v.pooling_kernel_size,
            position_embedding_size=v.position_embedding_size,
            rope_theta=float(rope.get("rope_theta", 100.0)),
            standardize=bool(v.standardize),
            use_clipped_linears=bool(v.use_clipped_linears),
            text_hidden_size=text_config(hf_config).hidden_size,
            max_soft_tokens=getattr(v, "default_output_length", None),
        )

    @property
    def rope_inv_freq(self) -> tuple[float, ...]:
        """Frequencies of one axis: a quarter of the head's channels per axis and half."""
        half = self.head_dim // 2
        exponents = np.arange(0, half, 2, dtype=np.float32) / half
        return tuple(float(f) for f in (1.0 / self.rope_theta ** exponents).astype(np.float32))


def _bound(value: float, dtype) -> nnx.Param:
    return nnx.Param(jnp.full((), value, dtype), out_sharding=())


class ClippableProjection(nnx.Module):
    """`einsum(spec, x, weight)`; with `use_clipped_linears`, its input and output clamped to the
    checkpoint's `input_min/max`, `output_min/max` (unbounded until loaded)."""

    def __init__(self, spec: str, shape: tuple[int, ...], sharding: tuple, clipped: bool, dtype, rngs: nnx.Rngs):
        self.spec = spec
        self.weight = param(rngs, shape, dtype, sharding)
        self.clipped = clipped
        if clipped:
            self.input_min, self.input_max = _bound(-jnp.inf, dtype), _bound(jnp.inf, dtype)
            self.output_min, self.output_max = _bound(-jnp.inf, dtype), _bound(jnp.inf, dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.clipped:
            x = jnp.clip(x, self.input_min[...], self.input_max[...])
        y = jnp.einsum(self.spec, x, self.weight[...])
        if self.clipped:
            y = jnp.clip(y, self.output_min[...], self.output_max[...])
        return y


def apply_axial_rope(x: jax.Array, positions: jax.Array, inv_freq: tuple[float, ...]) -> jax.Array:
    """x [B, P, heads, H]; positions [B, P, 2] = (x, y). Channels [0, H/2) rotate by the x
    coordinate, [H/2, H) by y, each half as split-half pairs (i, i + H/4)."""
    freq = jnp.asarray(inv_freq, jnp.float32)
    out = []
    for axis, part in enumerate(jnp.split(x, 2, axis=-1)):
        angles = positions[..., axis, None].astype(jnp.float32) * freq
        angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
        # cos/sin in x's dtype, as transformers applies them.
        cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
        first, second = jnp.split(part, 2, axis=-1)
        out.append(part * cos + jnp.concatenate([-second, first], axis=-1) * sin)
    return jnp.concatenate(out, axis=-1)


class Gemma4PatchEmbedder(nnx.Module):
    def __init__(self, config: Gemma4VisionConfig, dtype, rngs: nnx.Rngs):
        d, p = config.hidden_size, config.patch_size
        self.input_proj = param(rngs, (3 * p * p, d), dtype, (None, None))
        # Row 0 embeds the x coordinate, row 1 the y coordinate.
        self.position_embedding_table = param(rngs, (2, config.position_embedding_size, d), dtype,
                                              (None, None, None))

    def __call__(self, pixel_values: jax.Array, positions: jax.Array, padding: jax.Array) -> jax.Array:
        # No normalisation in the image processor: pixels in [0, 1] are mapped to [-1, 1] here.
        pixels = (2 * (pixel_values - 0.5)).astype(self.input_proj.dtype)
        h = jnp.einsum("BPC,CD->BPD", pixels, self.input_proj[...])
        index = jnp.maximum(positions, 0)  # padding (-1) looks up row 0, then is zeroed
        table = self.position_embedding_table[...]
        embedded = table[0][index[..., 0]] + table[1][index[..., 1]]
        return h + jnp.where(padding[..., None], 0.0, embedded).astype(h.dtype)


class Gemma4VisionAttention(nnx.Module):
    def __init__(self, config: Gemma4VisionConfig, mesh: Mesh, dtype, rngs: nnx.Rngs):
        self.config = config
        d, n, k, h = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
        clip = config.use_clipped_linears
        # Heads over the tensor axis where they divide evenly (12 heads at TP 8 stay whole).
        heads, kv_heads = CausalLM.kv_head_sharding(n, mesh), CausalLM.kv_head_sharding(k, mesh)
        self.q_proj = ClippableProjection("BPD,DNH->BPNH", (d, n, h), (None, heads, None), clip, dtype, rngs)
        self.k_proj = ClippableProjection("BPD,DKH->BPKH", (d, k, h), (None, kv_heads, None), clip, dtype, rngs)
        self.v_proj = ClippableProjection("BPD,DKH->BPKH", (d, k, h), (None, kv_heads, None), clip, dtype, rngs)
        self.o_proj = ClippableProjection("BPNH,NHD->BPD", (n, h, d), (heads, None, None), clip, dtype, rngs)
        self.q_norm = RMSNormScaledInFP32(h, config.rms_norm_eps, dtype)
        self.k_norm = RMSNormScaledInFP32(h, config.rms_norm_eps, dtype)

    def __call__(self, x: jax.Array, positions: jax.Array, padding: jax.Array) -> jax.Array:
        c = self.config
        inv_freq = c.rope_inv_freq
        q = apply_axial_rope(self.q_norm(self.q_proj(x)), positions, inv_freq)
        k = apply_axial_rope(self.k_norm(self.k_proj(x)), positions, inv_freq)
        v = rms_normalize(self.v_proj(x), c.rms_norm_eps)
        b, p, n, h = q.shape
        q = q.reshape(b, p, c.num_kv_heads, n // c.num_kv_heads, h)  # query heads grouped by their KV head
        scores = jnp.einsum("BQKGH,BSKH->BKGQS", q, k).astype(jnp.float32)  # scale 1.0: q and k are normed
        # Padding is never a key (finite, so an all-padding image gives no NaN).
        scores = jnp.where(padding[:, None, None, None, :], jnp.finfo(jnp.float32).min, scores)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out = jnp.einsum("BKGQS,BSKH->BQKGH", probs, v).reshape(b, p, n, h)
        return self.o_proj(out)


class Gemma4VisionMLP(nnx.Module):
    def __init__(self, config: Gemma4VisionConfig, dtype, rngs: nnx.Rngs):
        d, f, clip = config.hidden_size, config.intermediate_size, config.use_clipped_linears
        self.act = ACTIVATIONS[config.hidden_activation]
        self.gate_proj = ClippableProjection("BPD,DF->BPF", (d, f), (None, Axis.MLP_TENSOR), clip, dtype, rngs)
        self.up_proj = ClippableProjection("BPD,DF->BPF", (d, f), (None, Axis.MLP_TENSOR), clip, dtype, rngs)
        self.down_proj = ClippableProjection("BPF,FD->BPD", (f, d), (Axis.MLP_TENSOR, None), clip, dtype, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class Gemma4VisionLayer(nnx.Module):
    def __init__(self, config: Gemma4VisionConfig, mesh: Mesh, dtype, rngs: nnx.Rngs):
        d, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = RMSNormScaledInFP32(d, eps, dtype)
        self.attn = Gemma4VisionAttention(config, mesh, dtype, rngs)
        self.post_attention_layernorm = RMSNormScaledInFP32(d, eps, dtype)
        self.pre_feedforward_layernorm = RMSNormScaledInFP32(d, eps, dtype)
        self.mlp = Gemma4VisionMLP(config, dtype, rngs)
        self.post_feedforward_layernorm = RMSNormScaledInFP32(d, eps, dtype)

    def __call__(self, x: jax.Array, positions: jax.Array, padding: jax.Array) -> jax.Array:
        x = x + self.post_attention_layernorm(self.attn(self.input_layernorm(x), positions, padding))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


def pool_soft_tokens(h: jax.Array, positions: jax.Array, padding: jax.Array, k: int) -> jax.Array:
    """[B, P, D] patches -> [B, P / k^2, D]: the mean of each k x k block of patches, blocks in
    row-major order (as many as the image has; the rest of the P / k^2 slots stay zero)."""
    num_tokens = h.shape[1] // (k * k)
    h = jnp.where(padding[..., None], 0.0, h)
    index = jnp.maximum(positions, 0)
    blocks_per_row = (jnp.max(index[..., 0], axis=-1, keepdims=True) + 1) // k  # the image's width in blocks
    block = index // k
    slot = block[..., 0] + blocks_per_row * block[..., 1]
    weights = jax.nn.one_hot(slot, num_tokens, dtype=jnp.float32) / (k * k)
    # Padding patches join slot 0 with zero features, as transformers' one-hot average does.
    return jnp.einsum("BPL,BPD->BLD", weights, h.astype(jnp.float32)).astype(h.dtype)


class Gemma4ImageEncoder(nnx.Module):
    """Gemma 4's vision tower (`model.vision_tower`) and embedder (`model.embed_vision`)."""

    config_class = Gemma4VisionConfig

    # Standalone loading with `load_checkpoint`: tensor names as the rules below read them.
    checkpoint_prefixes = ("model.",)
    skipped_prefixes = ("language_model.", "audio_tower.", "embed_audio.", "lm_head.")

    def __init__(self, config: Gemma4VisionConfig, dtype, mesh: Mesh, rngs: nnx.Rngs):
        self.config = config
        self.patch_embedder = Gemma4PatchEmbedder(config, dtype, rngs)
        self.layers = nnx.List([Gemma4VisionLayer(config, mesh, dtype, rngs) for _ in range(config.num_layers)])
        if config.standardize:
            self.std_bias = param(rngs, (config.hidden_size,), dtype, (None,))
            self.std_scale = param(rngs, (config.hidden_size,), dtype, (None,))
        self.embedding_projection = param(rngs, (config.hidden_size, config.text_hidden_size), dtype, (None, None))

    def __call__(self, pixel_values: jax.Array, pixel_position_ids: jax.Array) -> jax.Array:
        """[B, P, 3 * patch^2] pixels and [B, P, 2] positions -> [B, P / k^2, text_hidden] soft tokens
        (each image's first (its patches) / k^2 rows are its features; the rest are padding). Jittable."""
        c = self.config
        padding = jnp.all(pixel_position_ids == -1, axis=-1)
        h = self.patch_embedder(pixel_values, pixel_position_ids, padding)
        for layer in self.layers:
            h = layer(h, pixel_position_ids, padding)
        pooled = pool_soft_tokens(h, pixel_position_ids, padding, c.pooling_kernel_size)
        # sqrt(hidden) can exceed fp16's range: scaled (and standardized) in fp32.
        soft = pooled.astype(jnp.float32) * c.hidden_size ** 0.5
        if c.standardize:
            soft = (soft - self.std_bias[...].astype(jnp.float32)) * self.std_scale[...].astype(jnp.float32)
        soft = soft.astype(h.dtype)
        return jnp.einsum("BLD,DE->BLE", rms_normalize(soft, c.rms_norm_eps), self.embedding_projection[...])

    def encode_images(self, pixel_values, pixel_position_ids, **unused) -> list[jax.Array]:
        """The features of each image, as `embed_multimodal(**kwargs)` must return them.

        Args (exactly what vLLM's `Gemma4MultiModalProcessor` produces, batched by the runner;
        CPU torch tensors, numpy or jax arrays; also a list of per-image tensors):
          pixel_values: [num_images, max_patches, 3 * patch_size**2] float (fp32 from the
            processor; any float dtype), pixels in [0, 1] in (row, column, channel) order per
            patch; each image's patches in row-major order, then zero rows up to max_patches
            (= default_output_length * pooling_kernel_size**2, 630 for the tiny checkpoints).
          pixel_position_ids: [num_images, max_patches, 2] int, each patch's (x, y) in patches,
            (-1, -1) on the padding rows.
        Returns: a list of num_images arrays in the model's dtype, image i of shape
          [num_soft_tokens_i, text_hidden_size] with num_soft_tokens_i = (patches of image i) /
          pooling_kernel_size**2: one row per `<|image|>` placeholder of that image, in prompt order.
        """
        if isinstance(pixel_values, (list, tuple)):  # images whose patch counts differ: one at a time
            return [feature for pv, pos in zip(pixel_values, pixel_position_ids, strict=True)
                    for feature in self.encode_images(pv, pos)]
        pixels, positions = host_array(pixel_values), host_array(pixel_position_ids).astype(np.int32)
        if pixels.ndim == 2:  # a single image
            pixels, positions = pixels[None], positions[None]
        k2 = self.config.pooling_kernel_size ** 2
        counts = (~np.all(positions == -1, axis=-1)).sum(axis=-1)
        if np.any(counts % k2):
            raise ValueError(f"Gemma 4 image patch counts {counts.tolist()} are not multiples of "
                             f"pooling_kernel_size**2={k2}")
        # One image per call: every call has the processor's one shape, compiled once (at warm-up).
        return [_encode(self, jnp.asarray(pixels[i:i + 1]), jnp.asarray(positions[i:i + 1]))[0, :n]
                for i, n in enumerate((counts // k2).tolist())]

    def warmup_inputs(self) -> dict | None:
        """`encode_images` arguments of one image of the processor's shape, for the runner's warm-up."""
        c = self.config
        if c.max_soft_tokens is None:
            return None  # the processor's shape is unknown: the first image compiles
        patches = c.max_soft_tokens * c.pooling_kernel_size ** 2
        side = c.pooling_kernel_size  # a k x k image: one soft token, the rest padding
        positions = np.full((1, patches, 2), -1, np.int32)
        positions[0, :side * side] = np.stack(np.meshgrid(np.arange(side), np.arange(side)), -1).reshape(-1, 2)
        return dict(pixel_values=np.zeros((1, patches, 3 * c.patch_size ** 2), np.float32),
                    pixel_position_ids=positions)

    def checkpoint_rules(self) -> list[Rule]:
        """Tensor names after `model.` (as the text model's loader strips it)."""
        c = self.config
        layer = r"vision_tower\.encoder\.layers\.(\d+)\."
        attn, mlp = layer + r"self_attn\.", layer + r"mlp\."
        norms = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                 "post_feedforward_layernorm")
        bounds = r"(input_min|input_max|output_min|output_max)"
        return [
            Rule(r"vision_tower\.patch_embedder\.input_proj\.weight", ("patch_embedder.input_proj",), transpose),
            Rule(r"vision_tower\.patch_embedder\.position_embedding_table",
                 ("patch_embedder.position_embedding_table",)),
            Rule(layer + rf"({'|'.join(norms)})\.weight", ("layers.{0}.{1}.weight",)),
            Rule(attn + r"(q_norm|k_norm)\.weight", ("layers.{0}.attn.{1}.weight",)),
            Rule(attn + r"q_proj\.linear\.weight", ("layers.{0}.attn.q_proj.weight",), heads_in(c.num_heads)),
            Rule(attn + r"(k_proj|v_proj)\.linear\.weight", ("layers.{0}.attn.{1}.weight",),
                 heads_in(c.num_kv_heads)),
            Rule(attn + r"o_proj\.linear\.weight", ("layers.{0}.attn.o_proj.weight",), heads_out(c.num_heads)),
            Rule(attn + rf"(q_proj|k_proj|v_proj|o_proj)\.{bounds}", ("layers.{0}.attn.{1}.{2}",)),
            Rule(mlp + r"(gate_proj|up_proj|down_proj)\.linear\.weight", ("layers.{0}.mlp.{1}.weight",), transpose),
            Rule(mlp + rf"(gate_proj|up_proj|down_proj)\.{bounds}", ("layers.{0}.mlp.{1}.{2}",)),
            Rule(r"vision_tower\.(std_bias|std_scale)", ("{0}",)),
            Rule(r"embed_vision\.embedding_projection\.weight", ("embedding_projection",), transpose),
        ]


@nnx.jit
def _encode(encoder: Gemma4ImageEncoder, pixel_values: jax.Array, pixel_position_ids: jax.Array) -> jax.Array:
    return encoder(pixel_values, pixel_position_ids)
