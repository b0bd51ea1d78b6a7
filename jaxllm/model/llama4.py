"""Llama 4 text decoder (dense and MoE) on tpu-inference's model contract.

Semantics follow transformers' `models/llama4/modeling_llama4.py`:
- layers with RoPE use chunked-local attention (a key is visible only inside the
  query's `attention_chunk_size` block) and, with `use_qk_norm`, a weightless
  L2 norm of q and k after RoPE; NoPE layers attend globally and, with
  `attn_temperature_tuning`, scale queries by log1p(floor((pos + 1) / floor_scale)) * attn_scale + 1;
- RoPE is the complex, interleaved-pair form, with the config's (llama3) scaling;
- MoE layers: sigmoid top-k router scaling the expert input, plus a shared expert;
  dense layers use `intermediate_size_mlp`.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh
from tpu_inference.layers.common.sharding import ShardingAxisName as Axis

from jaxllm.attention.dispatch import attention
from jaxllm.model.causal_lm import CausalLM, merge_heads
from jaxllm.model.config import Llama4Config
from jaxllm.model.mlp import GatedMLP, Llama4MoE, MoESetup, expert_rules
from jaxllm.model.norms import RMSNorm, rms_normalize
from jaxllm.model.params import param
from jaxllm.model.quantization import scale_rows
from jaxllm.model.rope import apply_rope_interleaved
from jaxllm.model.vision.llama4 import Llama4ImageEncoder
from jaxllm.model.weights import Rule, heads_in, heads_out, split_last, transpose


class Llama4Attention(nnx.Module):
    def __init__(self, config: Llama4Config, layer: int, chunk_size: int | None, kv_sharding, dtype,
                 mesh: Mesh, rngs: nnx.Rngs):
        self.config = config
        self.use_rope = config.rope_layers[layer]
        # Chunked-local only on RoPE layers; None when no sequence can cross a chunk.
        self.chunk_size = chunk_size if self.use_rope else None
        self.mesh = mesh
        d, n, k, h = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
        self.q_proj = param(rngs, (d, n, h), dtype, (None, Axis.ATTN_HEAD, None))
        self.k_proj = param(rngs, (d, k, h), dtype, (None, kv_sharding, None))
        self.v_proj = param(rngs, (d, k, h), dtype, (None, kv_sharding, None))
        self.o_proj = param(rngs, (n, h, d), dtype, (Axis.ATTN_HEAD, None, None))

    def __call__(self, kv_cache, x, positions, metadata):
        c = self.config
        q = jnp.einsum("TD,DNH->TNH", x, self.q_proj[...])
        k = jnp.einsum("TD,DKH->TKH", x, self.k_proj[...])
        v = jnp.einsum("TD,DKH->TKH", x, self.v_proj[...])
        if self.use_rope:
            q = apply_rope_interleaved(q, positions, c.rope_inv_freq, c.rope_scaling)
            k = apply_rope_interleaved(k, positions, c.rope_inv_freq, c.rope_scaling)
            if c.use_qk_norm:
                q, k = rms_normalize(q, c.rms_norm_eps), rms_normalize(k, c.rms_norm_eps)
        elif c.attn_temperature_tuning:
            scale = jnp.log1p(jnp.floor((positions.astype(jnp.float32) + 1.0) / c.floor_scale)) * c.attn_scale + 1.0
            q = (q * scale[:, None, None].astype(q.dtype)).astype(q.dtype)
        out, kv_cache = attention(q, k, v, kv_cache, metadata, self.mesh, sm_scale=c.head_dim ** -0.5,
                                  chunk_size=self.chunk_size)
        return kv_cache, merge_heads(out, self.o_proj[...])


class Llama4DecoderLayer(nnx.Module):
    def __init__(self, config: Llama4Config, layer: int, chunk_size, kv_sharding, dtype, mesh, moe: MoESetup,
                 rngs):
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.attn = Llama4Attention(config, layer, chunk_size, kv_sharding, dtype, mesh, rngs)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        if layer in config.moe_layers:
            self.feed_forward = Llama4MoE(config.hidden_size, config.intermediate_size, config.num_experts,
                                          config.num_experts_per_tok, dtype, rngs, moe)
        else:
            self.feed_forward = GatedMLP(config.hidden_size, config.intermediate_size_mlp, "silu", dtype, rngs)

    def __call__(self, kv_cache, x, positions, metadata, live):
        kv_cache, attended = self.attn(kv_cache, self.input_layernorm(x), positions, metadata)
        x = x + attended
        h = self.post_attention_layernorm(x)
        return kv_cache, x + (self.feed_forward(h, live) if isinstance(self.feed_forward, Llama4MoE)
                              else self.feed_forward(h))


class JaxLlama4ForCausalLM(CausalLM):
    """Llama 4 text model; also serves the text part of `Llama4ForConditionalGeneration` checkpoints."""

    config_class = Llama4Config

    def build(self, config: Llama4Config, dtype, mesh: Mesh, rngs: nnx.Rngs, max_model_len: int) -> None:
        chunk = config.attention_chunk_size
        if chunk is not None and max_model_len <= chunk:
            chunk = None  # no sequence reaches a second chunk: plain causal attention is exact
        kv_sharding = self.kv_head_sharding(config.num_kv_heads, mesh)
        self.moe = Llama4MoE.setup_for(self.moe, config.num_experts_per_tok)
        self.layers = nnx.List([Llama4DecoderLayer(config, i, chunk, kv_sharding, dtype, mesh, self.moe, rngs)
                                for i in range(config.num_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)

    def checkpoint_rules(self) -> list[Rule]:
        c = self.config
        layer = r"model\.layers\.(\d+)\."
        ffn = layer + r"feed_forward\."
        return [
            *self.embedding_rules(),
            Rule(r"model\.norm\.weight", ("norm.weight",)),
            Rule(layer + r"input_layernorm\.weight", ("layers.{0}.input_layernorm.weight",)),
            Rule(layer + r"post_attention_layernorm\.weight", ("layers.{0}.post_attention_layernorm.weight",)),
            Rule(layer + r"self_attn\.q_proj\.weight", ("layers.{0}.attn.q_proj",), heads_in(c.num_heads)),
            Rule(layer + r"self_attn\.k_proj\.weight", ("layers.{0}.attn.k_proj",), heads_in(c.num_kv_heads)),
            Rule(layer + r"self_attn\.v_proj\.weight", ("layers.{0}.attn.v_proj",), heads_in(c.num_kv_heads)),
            Rule(layer + r"self_attn\.o_proj\.weight", ("layers.{0}.attn.o_proj",), heads_out(c.num_heads)),
            Rule(ffn + r"(gate_proj|up_proj|down_proj)\.weight", ("layers.{0}.feed_forward.{1}",), transpose),
            Rule(ffn + r"router\.weight", ("layers.{0}.feed_forward.router",), transpose),
            # Torch layouts [E, D, 2F] (gate, then up) and [E, F, D], as ours; or one Linear per expert.
            *expert_rules(self.moe, ffn + r"experts\.", "layers.{0}.feed_forward.experts.", split_last(2),
                          lambda w: (w,)),
            # Per-expert FP8 (Llama 4 Maverick's release): each weight's scale per output channel.
            Rule(ffn + r"experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight_scale",
                 ("layers.{0}.feed_forward.experts.{2}.array.scale",), scale_rows, row="{1}"),
            Rule(ffn + r"shared_expert\.(gate_proj|up_proj|down_proj)\.weight",
                 ("layers.{0}.feed_forward.shared_expert.{1}",), transpose),
        ]

    # Multimodal checkpoints keep the text model under `language_model.`; the rest is vision.
    checkpoint_prefixes = ("language_model.",)
    image_prefixes = ("vision_model.", "multi_modal_projector.")

    def __call__(self, kv_caches, input_ids, attention_metadata, inputs_embeds=None, input_positions=None,
                 layer_name_to_kvcache_index=None, *unused_args, **unused_kwargs):
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        kv_caches = list(kv_caches)
        live = self.live_tokens(attention_metadata, x.shape[0])
        for i, layer in enumerate(self.layers):
            slot, metadata = self.layer_cache(i, layer_name_to_kvcache_index, attention_metadata)
            kv_caches[slot], x = layer(kv_caches[slot], x, metadata.input_positions, metadata, live)
        return kv_caches, self.norm(x), [], None


class JaxLlama4ForConditionalGeneration(JaxLlama4ForCausalLM):
    """A multimodal Llama 4 checkpoint: the text model, and the image encoder (`jaxllm.model.vision.llama4`)."""

    image_encoder_class = Llama4ImageEncoder
