"""Gemma 4 text decoder on tpu-inference's model contract.

Semantics follow transformers' `models/gemma4/modeling_gemma4.py`; every feature
comes from the config (`Gemma4Config`):
- `layer_types`: sliding-window layers (`q - sliding_window < k <= q`) and full
  layers, each type with its own RoPE from `rope_parameters` (split-half form;
  full layers use "proportional" RoPE, rotating only a `partial_rotary_factor`
  share of the head) and, on full layers, its own head size and KV head count;
- attention: per-head RMS norms of q and k (with weights) before RoPE, a
  weightless RMS norm of v, scale 1.0; with `attention_k_eq_v`, full layers take
  V from the raw k projection (before k_norm);
- KV sharing: the last `num_kv_shared_layers` layers have no K/V of their own;
  they read the cache of the last earlier layer of their type (the runner points
  their `layer.{i}` at that slot) and write nothing;
- block: `h = x + post_attn_norm(attn(input_norm(x)))`, then
  `h + post_ffw_norm(ffw(pre_ffw_norm(h)))` where, with `enable_moe_block`,
  `ffw` is `post_ffw_norm_1(mlp(.))` plus `post_ffw_norm_2(experts(pre_ffw_norm_2(h)))`
  routed on `h`; then the per-layer-input branch; the result times `layer_scalar`;
- per-layer inputs (PLE): a second, packed embedding plus a projection of the
  main embedding give each layer a small input that gates a residual branch;
- embeddings scaled by sqrt(hidden) (the scale rounded to the weights' dtype, as
  HF does), tied LM head, `final_logit_softcapping`;
- `use_bidirectional_attention="vision"` (`bidirectional_vision`): on sliding layers each
  run of image / video soft tokens in a step also attends to itself ahead (HF's
  `create_masks_for_vision_model`); the runs come from the token ids, so the model needs
  them beside a multimodal step's embeddings, and a whole image must be in one step
  (the plugin sets `disable_chunked_mm_input`);
- RMS norms scale in fp32 and cast back afterwards (`RMSNormScaledInFP32`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh
from tpu_inference.layers.common.sharding import ShardingAxisName as Axis
from tpu_inference.utils import get_mesh_shape_product

from jaxllm.attention.bidirectional import run_ids
from jaxllm.attention.dispatch import attention
from jaxllm.model.causal_lm import CausalLM, merge_heads
from jaxllm.model.config import Gemma4Config, Gemma4LayerConfig, text_config
from jaxllm.model.mlp import ACTIVATIONS, GatedMLP, Gemma4MoE, MoESetup, expert_rules
from jaxllm.model.norms import RMSNormScaledInFP32, rms_normalize
from jaxllm.model.params import ones, param
from jaxllm.model.rope import apply_rope_split_half
from jaxllm.model.vision.gemma4 import Gemma4ImageEncoder
from jaxllm.model.weights import Rule, heads_in, heads_out, split_last, transpose


class Gemma4Attention(nnx.Module):
    def __init__(self, config: Gemma4Config, layer: Gemma4LayerConfig, kv_sharding, dtype, mesh: Mesh,
                 rngs: nnx.Rngs):
        self.layer = layer
        self.eps = config.rms_norm_eps
        self.sliding_window = config.sliding_window if layer.sliding else None
        self.mesh = mesh
        d, n, k, h = config.hidden_size, config.num_heads, layer.num_kv_heads, layer.head_dim
        self.q_proj = param(rngs, (d, n, h), dtype, (None, Axis.ATTN_HEAD, None))
        self.q_norm = RMSNormScaledInFP32(h, config.rms_norm_eps, dtype)
        if layer.kv_donor is None:  # KV-shared layers have no K/V weights
            self.k_proj = param(rngs, (d, k, h), dtype, (None, kv_sharding, None))
            if not layer.k_eq_v:
                self.v_proj = param(rngs, (d, k, h), dtype, (None, kv_sharding, None))
            self.k_norm = RMSNormScaledInFP32(h, config.rms_norm_eps, dtype)
        self.o_proj = param(rngs, (n, h, d), dtype, (Axis.ATTN_HEAD, None, None))

    def __call__(self, kv_cache, x, positions, metadata, donor_kv, block_ids=None):
        """Returns (kv_cache, this step's (k, v), output). `donor_kv`: the donor's (k, v) on a KV-shared layer;
        `block_ids`: the step's vision runs (`run_ids`), on sliding layers with bidirectional vision."""
        layer = self.layer
        q = self.q_norm(jnp.einsum("TD,DNH->TNH", x, self.q_proj[...]))
        q = apply_rope_split_half(q, positions, layer.rope_inv_freq, layer.rope_scaling)
        if layer.kv_donor is None:
            raw_k = jnp.einsum("TD,DKH->TKH", x, self.k_proj[...])
            v = raw_k if layer.k_eq_v else jnp.einsum("TD,DKH->TKH", x, self.v_proj[...])
            k = apply_rope_split_half(self.k_norm(raw_k), positions, layer.rope_inv_freq, layer.rope_scaling)
            v = rms_normalize(v, self.eps)
        else:
            # The donor already wrote these into the cache this layer reads; passing them keeps
            # the portable attention (which attends to the new K/V it is given) exact, while
            # the TPU kernel reads them from the cache when it may not write.
            k, v = donor_kv
        out, kv_cache = attention(q, k, v, kv_cache, metadata, self.mesh, sm_scale=1.0,
                                  sliding_window=self.sliding_window, update_kv_cache=layer.kv_donor is None,
                                  block_ids=block_ids)
        return kv_cache, (k, v), merge_heads(out, self.o_proj[...])


class Gemma4DecoderLayer(nnx.Module):
    def __init__(self, config: Gemma4Config, i: int, kv_sharding, dtype, mesh: Mesh, moe: MoESetup,
                 rngs: nnx.Rngs):
        layer = config.layers[i]
        d, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = RMSNormScaledInFP32(d, eps, dtype)
        self.attn = Gemma4Attention(config, layer, kv_sharding, dtype, mesh, rngs)
        self.post_attention_layernorm = RMSNormScaledInFP32(d, eps, dtype)
        self.pre_feedforward_layernorm = RMSNormScaledInFP32(d, eps, dtype)
        self.mlp = GatedMLP(d, layer.intermediate_size, config.hidden_activation, dtype, rngs)
        self.post_feedforward_layernorm = RMSNormScaledInFP32(d, eps, dtype)
        self.enable_moe_block = config.enable_moe_block
        if config.enable_moe_block:
            self.post_feedforward_layernorm_1 = RMSNormScaledInFP32(d, eps, dtype)
            self.pre_feedforward_layernorm_2 = RMSNormScaledInFP32(d, eps, dtype)
            self.moe = Gemma4MoE(d, config.moe_intermediate_size, config.num_experts, config.top_k_experts,
                                 config.hidden_activation, eps, dtype, rngs, moe)
            self.post_feedforward_layernorm_2 = RMSNormScaledInFP32(d, eps, dtype)
        self.per_layer_input = bool(config.hidden_size_per_layer_input)
        if self.per_layer_input:
            p = config.hidden_size_per_layer_input
            self.act = ACTIVATIONS[config.hidden_activation]
            self.per_layer_input_gate = param(rngs, (d, p), dtype, (None, None))
            self.per_layer_projection = param(rngs, (p, d), dtype, (None, None))
            self.post_per_layer_input_norm = RMSNormScaledInFP32(d, eps, dtype)
        self.layer_scalar = ones((1,), dtype)

    def __call__(self, kv_cache, x, positions, metadata, donor_kv, per_layer_input, block_ids=None, live=None):
        kv_cache, kv, attended = self.attn(kv_cache, self.input_layernorm(x), positions, metadata, donor_kv,
                                           block_ids)
        x = x + self.post_attention_layernorm(attended)
        ffw = self.mlp(self.pre_feedforward_layernorm(x))
        if self.enable_moe_block:
            experts = self.moe(x, self.pre_feedforward_layernorm_2(x), live)
            ffw = self.post_feedforward_layernorm_1(ffw) + self.post_feedforward_layernorm_2(experts)
        x = x + self.post_feedforward_layernorm(ffw)
        if self.per_layer_input:
            gate = self.act(jnp.einsum("TD,DP->TP", x, self.per_layer_input_gate[...]))
            branch = jnp.einsum("TP,PD->TD", gate * per_layer_input, self.per_layer_projection[...])
            x = x + self.post_per_layer_input_norm(branch)
        return kv_cache, kv, x * self.layer_scalar[...]


class JaxGemma4ForCausalLM(CausalLM):
    """Gemma 4 text model; also serves the text part of `Gemma4ForConditionalGeneration` checkpoints."""

    config_class = Gemma4Config

    def build(self, config: Gemma4Config, dtype, mesh: Mesh, rngs: nnx.Rngs, max_model_len: int) -> None:
        self.layers = nnx.List([
            Gemma4DecoderLayer(config, i, self.kv_head_sharding(layer.num_kv_heads, mesh), dtype, mesh, self.moe,
                               rngs)
            for i, layer in enumerate(config.layers)])
        self.norm = RMSNormScaledInFP32(config.hidden_size, config.rms_norm_eps, dtype)
        if config.hidden_size_per_layer_input:
            packed = config.num_layers * config.hidden_size_per_layer_input
            self.embed_per_layer = param(rngs, (config.vocab_size_per_layer_input, packed), dtype,
                                         (Axis.MLP_TENSOR, None))
            self.per_layer_model_projection = param(rngs, (config.hidden_size, packed), dtype, (None, None))
            self.per_layer_projection_norm = RMSNormScaledInFP32(config.hidden_size_per_layer_input,
                                                                 config.rms_norm_eps, dtype)

    def embed_tokens(self, input_ids: jax.Array) -> jax.Array:
        # HF multiplies by sqrt(hidden) cast to the weights' dtype (55.4 becomes 55.5 in bf16).
        scale = jnp.asarray(self.config.hidden_size ** 0.5, self.dtype)
        return super().embed_tokens(self.text_ids(input_ids)) * scale

    def text_ids(self, input_ids: jax.Array) -> jax.Array:
        """Image/video/audio placeholders as padding: like transformers, the text embeddings (and the
        per-layer inputs) of those positions are the pad token's; image features replace them later."""
        c = self.config
        if not c.placeholder_token_ids:
            return input_ids
        placeholder = jnp.isin(input_ids, jnp.asarray(c.placeholder_token_ids, input_ids.dtype))
        return jnp.where(placeholder, c.pad_token_id, input_ids)

    @classmethod
    def attends_within_images(cls, hf_config) -> bool:
        # As Gemma4Config.from_hf reads it, without building the config (this runs at vLLM's config check).
        c = text_config(hf_config)
        return c is not hf_config and getattr(c, "use_bidirectional_attention", None) == "vision"

    @property
    def needs_token_ids(self) -> bool:
        # The per-layer inputs embed the token ids; bidirectional vision finds the image runs in them.
        return bool(self.config.hidden_size_per_layer_input) or self.config.bidirectional_vision

    def vision_runs(self, input_ids: jax.Array, metadata) -> jax.Array:
        """i32[T]: each image / video soft token's run in this step (its first token's index), -1 for the rest.

        As HF's `get_block_sequence_ids_for_mask`, a run is a maximal stretch of such tokens; in
        the packed batch it also ends where its request does. A run begun in an earlier step
        needs nothing more: those tokens are in the cache, and causally visible."""
        vision = jnp.isin(input_ids, jnp.asarray(self.config.vision_token_ids, input_ids.dtype))
        return run_ids(vision, metadata.query_start_loc, metadata.request_distribution)

    def per_layer_inputs(self, input_ids: jax.Array, embeds: jax.Array) -> jax.Array:
        """[T, layers, P]: (norm(embeds @ projection / sqrt(hidden)) + per-layer token embedding) / sqrt(2)."""
        c = self.config
        p = c.hidden_size_per_layer_input
        tokens = jnp.take(self.embed_per_layer[...], input_ids, axis=0) * jnp.asarray(p ** 0.5, self.dtype)
        projected = jnp.einsum("TD,DL->TL", embeds, self.per_layer_model_projection[...]) * c.hidden_size ** -0.5
        projected = self.per_layer_projection_norm(projected.reshape(-1, c.num_layers, p))
        return (projected + tokens.reshape(-1, c.num_layers, p)) * 2.0 ** -0.5

    def compute_logits(self, hidden_states: jax.Array) -> jax.Array:
        logits = super().compute_logits(hidden_states)
        cap = self.config.final_logit_softcapping
        return logits if cap is None else jnp.tanh(logits / cap) * cap

    # Text-only checkpoints keep the model under `model.`, multimodal ones under
    # `model.language_model.`; rules name tensors relative to the text model.
    checkpoint_prefixes = ("model.language_model.", "model.")
    image_prefixes = ("vision_tower.", "embed_vision.")
    skipped_prefixes = ("audio_tower.", "embed_audio.")  # audio input is refused at request time

    def checkpoint_rules(self) -> list[Rule]:
        c = self.config
        layer = r"layers\.(\d+)\."
        attn = layer + r"self_attn\."
        norms = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                 "post_feedforward_layernorm", "post_feedforward_layernorm_1", "pre_feedforward_layernorm_2",
                 "post_feedforward_layernorm_2", "post_per_layer_input_norm")
        rules = [
            *self.embedding_rules(r"embed_tokens\.weight"),
            Rule(r"norm\.weight", ("norm.weight",)),
            Rule(layer + rf"({'|'.join(norms)})\.weight", ("layers.{0}.{1}.weight",)),
            Rule(layer + r"layer_scalar", ("layers.{0}.layer_scalar",)),
            Rule(attn + r"q_proj\.weight", ("layers.{0}.attn.q_proj",), heads_in(c.num_heads)),
            Rule(attn + r"o_proj\.weight", ("layers.{0}.attn.o_proj",), heads_out(c.num_heads)),
            Rule(attn + r"(q_norm|k_norm)\.weight", ("layers.{0}.attn.{1}.weight",)),
            Rule(layer + r"mlp\.(gate_proj|up_proj|down_proj)\.weight", ("layers.{0}.mlp.{1}",), transpose),
            Rule(layer + r"router\.proj\.weight", ("layers.{0}.moe.router_proj",), transpose),
            Rule(layer + r"router\.scale", ("layers.{0}.moe.router_scale",)),
            Rule(layer + r"router\.per_expert_scale", ("layers.{0}.moe.per_expert_scale",)),
            # Torch layouts [E, 2F, D] (gate rows, then up rows) and [E, D, F] -> ours [E, D, F] x2, [E, F, D].
            *expert_rules(self.moe, layer + r"experts\.", "layers.{0}.moe.experts.",
                          lambda w: split_last(2)(w.transpose(0, 2, 1)), lambda w: (w.transpose(0, 2, 1),)),
            Rule(layer + r"(per_layer_input_gate|per_layer_projection)\.weight", ("layers.{0}.{1}",), transpose),
            Rule(r"embed_tokens_per_layer\.weight", ("embed_per_layer",)),
            Rule(r"per_layer_model_projection\.weight", ("per_layer_model_projection",), transpose),
            Rule(r"per_layer_projection_norm\.weight", ("per_layer_projection_norm.weight",)),
        ]
        kv_rules = []  # first: the first matching rule wins
        for i, spec in enumerate(c.layers):
            if spec.kv_donor is None:  # the KV head count differs between sliding and full layers
                kv_rules.append(Rule(rf"layers\.{i}\.self_attn\.(k_proj|v_proj)\.weight",
                                     (f"layers.{i}.attn.{{0}}",), heads_in(spec.num_kv_heads)))
            else:  # some checkpoints still carry K/V weights for KV-shared layers: like HF, ignore them
                kv_rules.append(Rule(rf"layers\.{i}\.self_attn\.(k_proj|v_proj|k_norm|v_norm)\.weight", (),
                                     lambda w: ()))
        return kv_rules + rules

    def load_weights(self, rng_key: jax.Array) -> None:
        super().load_weights(rng_key)
        for layer in self.layers:
            if layer.enable_moe_block:
                layer.moe.fold_per_expert_scale()

    def __call__(self, kv_caches, input_ids, attention_metadata, inputs_embeds=None, input_positions=None,
                 layer_name_to_kvcache_index=None, *unused_args, **unused_kwargs):
        c = self.config
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        per_layer = None
        if c.hidden_size_per_layer_input:
            if input_ids is None:
                raise NotImplementedError("Gemma 4 per-layer inputs need input_ids, not only inputs_embeds")
            per_layer = self.per_layer_inputs(self.text_ids(input_ids), x)
        if c.bidirectional_vision and input_ids is None:
            raise NotImplementedError("Gemma 4 bidirectional vision attention needs input_ids beside inputs_embeds")
        if c.bidirectional_vision and get_mesh_shape_product(self.mesh, Axis.ATTN_DATA) > 1:
            # The runs are found in one packed batch; attention data parallelism packs one per shard.
            raise NotImplementedError("Gemma 4 bidirectional vision attention with attention data parallelism")
        runs = {}  # id(metadata) -> its vision runs: every group's metadata describes the same tokens
        kv_caches = list(kv_caches)
        donor_kv = {}  # donor layer -> the (k, v) it computed this step, for the layers sharing its cache
        live = self.live_tokens(attention_metadata, x.shape[0]) if c.enable_moe_block else None
        for i, layer in enumerate(self.layers):
            spec = c.layers[i]
            slot, metadata = self.layer_cache(i, layer_name_to_kvcache_index, attention_metadata,
                                              metadata_layer=spec.kv_donor)
            block_ids = None
            if c.bidirectional_vision and spec.sliding:  # full layers stay causal, as in HF
                if id(metadata) not in runs:
                    runs[id(metadata)] = self.vision_runs(input_ids, metadata)
                block_ids = runs[id(metadata)]
            kv_caches[slot], kv, x = layer(kv_caches[slot], x, metadata.input_positions, metadata,
                                           donor_kv.get(spec.kv_donor), None if per_layer is None else per_layer[:, i],
                                           block_ids, live)
            if i in c.kv_donors:
                donor_kv[i] = kv
        return kv_caches, self.norm(x), [], None


class JaxGemma4ForConditionalGeneration(JaxGemma4ForCausalLM):
    """A multimodal Gemma 4 checkpoint: the text model, and the image encoder (`jaxllm.model.vision.gemma4`);
    the audio tower is not loaded."""

    image_encoder_class = Gemma4ImageEncoder
    unserved_modalities = ("audio", "video")
