"""Model configs, read once from the Hugging Face config into small typed dataclasses.

Every knob the model uses comes from here; nothing about an architecture is a
constant in the model code. Features we don't implement are refused at startup
with the field named, never silently ignored.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxllm.model.checkpoint_quantization import Fp8Experts, ModuleNames, checkpoint_quantization
from jaxllm.model.errors import UnsupportedConfigError, require


def text_config(hf_config):
    """The language model's config: `text_config` of a multimodal checkpoint, else the config itself."""
    return getattr(hf_config, "text_config", None) or hf_config


@dataclasses.dataclass(frozen=True)
class KVLayer:
    """What one attention layer needs from the KV cache, for sizing it per layer."""
    num_kv_heads: int
    head_dim: int
    sliding_window: int | None = None  # attends to the last `sliding_window` tokens only
    chunk_size: int | None = None      # attends only inside its `chunk_size`-token chunk
    kv_donor: int | None = None        # reads this earlier layer's cache and keeps none of its own




# Types whose frequencies don't depend on the sequence length. "dynamic" and
# "longrope" rescale with the current length, which one static table can't express.
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn", "proportional")


def rope_frequencies(hf_text_config, layer_type: str | None = None) -> tuple[tuple[float, ...], float]:
    """(inverse frequencies, cos/sin scaling) of the config's RoPE, as plain Python constants."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

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


@dataclasses.dataclass(frozen=True)
class Llama4Config:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    tie_word_embeddings: bool
    # Per layer: RoPE + chunked-local attention, or NoPE + global attention.
    rope_layers: tuple[bool, ...]
    attention_chunk_size: int | None
    use_qk_norm: bool
    attn_temperature_tuning: bool
    floor_scale: float
    attn_scale: float
    rope_inv_freq: tuple[float, ...]
    rope_scaling: float
    # Feed-forward: MoE layers get experts + a shared expert, the others a dense MLP.
    moe_layers: frozenset[int]
    num_experts: int
    num_experts_per_tok: int
    intermediate_size: int      # each expert and the shared expert
    intermediate_size_mlp: int  # dense layers
    # A pre-quantized checkpoint's routed experts (Llama 4 Maverick FP8's format); None: unquantized.
    fp8_experts: Fp8Experts | None = None

    def kv_layers(self) -> tuple[KVLayer, ...]:
        return tuple(KVLayer(self.num_kv_heads, self.head_dim, chunk_size=self.attention_chunk_size if rope else None)
                     for rope in self.rope_layers)

    @classmethod
    def from_hf(cls, hf_config) -> "Llama4Config":
        c = text_config(hf_config)
        require(c.hidden_act == "silu", f"Llama 4 hidden_act={c.hidden_act!r}: only 'silu' is supported")
        require(not c.attention_bias, "Llama 4 attention_bias=True is not supported")
        rope_layers = tuple(bool(flag) for flag in c.no_rope_layers)
        require(len(rope_layers) == c.num_hidden_layers,
                 f"no_rope_layers has {len(rope_layers)} entries for {c.num_hidden_layers} layers")
        inv_freq, scaling = rope_frequencies(c)
        return cls(
            vocab_size=c.vocab_size,
            hidden_size=c.hidden_size,
            num_layers=c.num_hidden_layers,
            num_heads=c.num_attention_heads,
            num_kv_heads=c.num_key_value_heads,
            head_dim=c.head_dim,
            rms_norm_eps=c.rms_norm_eps,
            tie_word_embeddings=bool(c.tie_word_embeddings),
            rope_layers=rope_layers,
            attention_chunk_size=c.attention_chunk_size,
            use_qk_norm=c.use_qk_norm,
            attn_temperature_tuning=bool(c.attn_temperature_tuning),
            floor_scale=float(c.floor_scale),
            attn_scale=float(c.attn_scale),
            rope_inv_freq=inv_freq,
            rope_scaling=scaling,
            moe_layers=frozenset(c.moe_layers),
            num_experts=c.num_local_experts,
            num_experts_per_tok=c.num_experts_per_tok,
            intermediate_size=c.intermediate_size,
            intermediate_size_mlp=c.intermediate_size_mlp,
            fp8_experts=checkpoint_quantization(hf_config, "Llama 4", _llama4_modules(hf_config, c)),
        )


def _llama4_modules(hf_config, c) -> ModuleNames:
    """Llama 4's torch Linear modules, named as its checkpoint names them (multimodal: under language_model.)."""
    multimodal = c is not hf_config
    return ModuleNames(prefix="language_model.model." if multimodal else "model.",
                       lm_head="language_model.lm_head" if multimodal else "lm_head",
                       num_layers=c.num_hidden_layers, moe_layers=frozenset(c.moe_layers),
                       num_experts=c.num_local_experts)


@dataclasses.dataclass(frozen=True)
class Gemma4LayerConfig:
    """What varies across Gemma 4's layers, resolved from `layer_types` and `per_layer_config`."""
    sliding: bool               # sliding-window attention, else full (global) attention
    head_dim: int
    num_kv_heads: int
    k_eq_v: bool                # V is the raw k projection (no v_proj)
    rope_inv_freq: tuple[float, ...]
    rope_scaling: float
    kv_donor: int | None        # KV-shared layer: the earlier layer whose cache it reads; else None
    intermediate_size: int      # the dense MLP (doubled on KV-shared layers with use_double_wide_mlp)


_GEMMA4_LAYER_TYPES = ("sliding_attention", "full_attention")
# Attributes transformers may store per layer that we read per layer.
_GEMMA4_PER_LAYER_FIELDS = {"head_dim", "num_key_value_heads"}


@dataclasses.dataclass(frozen=True)
class Gemma4Config:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    rms_norm_eps: float
    tie_word_embeddings: bool
    hidden_activation: str
    sliding_window: int | None
    final_logit_softcapping: float | None
    layers: tuple[Gemma4LayerConfig, ...]
    # MoE block (every layer, beside the dense MLP) when enable_moe_block.
    enable_moe_block: bool
    num_experts: int
    top_k_experts: int
    moe_intermediate_size: int
    # Per-layer inputs (PLE): 0 means off.
    hidden_size_per_layer_input: int
    vocab_size_per_layer_input: int
    # Multimodal checkpoints: image/video/audio placeholder ids, embedded as `pad_token_id`
    # (as transformers does) since we run no vision or audio tower.
    placeholder_token_ids: tuple[int, ...] = ()
    pad_token_id: int = 0
    # `use_bidirectional_attention="vision"` (31B, 26B-A4B) on a multimodal checkpoint: on sliding
    # layers, each contiguous run of image/video soft tokens (`vision_token_ids`) also attends to
    # itself ahead, still within the window below (transformers' `create_masks_for_vision_model`:
    # AND(sliding_window, OR(causal, same run))); full layers and text stay causal.
    bidirectional_vision: bool = False
    vision_token_ids: tuple[int, ...] = ()

    @property
    def kv_donors(self) -> frozenset[int]:
        """Layers whose K/V a later, KV-shared layer reads."""
        return frozenset(layer.kv_donor for layer in self.layers if layer.kv_donor is not None)

    def kv_layers(self) -> tuple[KVLayer, ...]:
        return tuple(KVLayer(layer.num_kv_heads, layer.head_dim,
                             sliding_window=self.sliding_window if layer.sliding else None, kv_donor=layer.kv_donor)
                     for layer in self.layers)

    @classmethod
    def from_hf(cls, hf_config) -> "Gemma4Config":
        from jaxllm.model.mlp import ACTIVATIONS

        checkpoint_quantization(hf_config, "Gemma 4")  # no quantized Gemma 4 format is accepted: refused by name
        c = text_config(hf_config)
        require(not c.attention_bias, "Gemma 4 attention_bias=True is not supported")
        require(c.use_bidirectional_attention in (None, "vision"),
                 f"Gemma 4 use_bidirectional_attention={c.use_bidirectional_attention!r}: only causal text "
                 "attention is supported (None, or 'vision': image soft tokens attend to each other)")
        require(c.hidden_activation in ACTIVATIONS,
                 f"Gemma 4 hidden_activation={c.hidden_activation!r}: supported are {sorted(ACTIVATIONS)}")
        per_layer = set(c.per_layer_attributes or ()) - _GEMMA4_PER_LAYER_FIELDS
        require(not per_layer, f"Gemma 4 per_layer_config overrides {sorted(per_layer)}: only "
                                f"{sorted(_GEMMA4_PER_LAYER_FIELDS)} may vary per layer")
        num_layers = c.num_hidden_layers
        layer_types = tuple(c.layer_types)
        require(len(layer_types) == num_layers,
                 f"layer_types has {len(layer_types)} entries for {num_layers} layers")
        unknown = sorted(set(layer_types) - set(_GEMMA4_LAYER_TYPES))
        require(not unknown, f"Gemma 4 layer_types {unknown}: supported are {list(_GEMMA4_LAYER_TYPES)}")
        for layer_type in set(layer_types):
            require(bool((c.rope_parameters or {}).get(layer_type)),
                     f"Gemma 4 rope_parameters has no entry for {layer_type!r} (NoPE layers are not supported)")
        if "sliding_attention" in layer_types:
            require(bool(c.sliding_window), f"Gemma 4 sliding_window={c.sliding_window!r} with sliding layers")

        # KV sharing: the last num_kv_shared_layers layers read the K/V of the last earlier
        # layer of their type (transformers' `store_full_length_kv` / tpu-inference's kv_share map).
        num_shared = c.num_kv_shared_layers or 0
        first_shared = num_layers - num_shared
        require(0 <= num_shared < num_layers, f"Gemma 4 num_kv_shared_layers={num_shared} of {num_layers} layers")
        earlier = layer_types[:first_shared]

        def donor(i: int) -> int | None:
            if i < first_shared:
                return None
            require(layer_types[i] in earlier, f"Gemma 4 num_kv_shared_layers={num_shared}: shared layer {i} "
                                                f"({layer_types[i]}) has no earlier {layer_types[i]} layer to read")
            return len(earlier) - 1 - earlier[::-1].index(layer_types[i])

        rope: dict[tuple[str, int], tuple[tuple[float, ...], float]] = {}
        layers = []
        for i, layer_type in enumerate(layer_types):
            lc = c.per_layer_config[i]  # this layer's view: its own head_dim / num_key_value_heads
            sliding = layer_type == "sliding_attention"
            if (layer_type, lc.head_dim) not in rope:
                rope[layer_type, lc.head_dim] = rope_frequencies(lc, layer_type)
            inv_freq, scaling = rope[layer_type, lc.head_dim]
            shared = donor(i)
            layers.append(Gemma4LayerConfig(
                sliding=sliding,
                head_dim=lc.head_dim,
                num_kv_heads=lc.num_key_value_heads,
                k_eq_v=bool(c.attention_k_eq_v) and not sliding,
                rope_inv_freq=inv_freq,
                rope_scaling=scaling,
                kv_donor=shared,
                intermediate_size=c.intermediate_size * (2 if c.use_double_wide_mlp and shared is not None else 1),
            ))
        for i, layer in enumerate(layers):
            if layer.kv_donor is not None:
                d = layers[layer.kv_donor]
                require((d.head_dim, d.num_kv_heads) == (layer.head_dim, layer.num_kv_heads),
                         f"Gemma 4 KV-shared layer {i} has head_dim/num_key_value_heads "
                         f"{layer.head_dim}/{layer.num_kv_heads}, its donor {layer.kv_donor} "
                         f"{d.head_dim}/{d.num_kv_heads}")

        moe = bool(c.enable_moe_block)
        if moe:
            for field in ("num_experts", "top_k_experts", "moe_intermediate_size"):
                require(getattr(c, field) is not None, f"Gemma 4 enable_moe_block=True needs {field}")
        ple = c.hidden_size_per_layer_input or 0
        placeholders, vision = (), ()
        if c is not hf_config:  # a multimodal checkpoint
            placeholders = tuple(getattr(hf_config, name) for name in ("image_token_id", "video_token_id",
                                                                        "audio_token_id")
                                 if getattr(hf_config, name, None) is not None)
            # HF's processor marks these as image (1) and video (2) in `mm_token_type_ids`; audio
            # soft tokens (3) stay causal.
            vision = tuple(getattr(hf_config, name) for name in ("image_token_id", "video_token_id")
                           if getattr(hf_config, name, None) is not None)
        return cls(
            vocab_size=c.vocab_size,
            hidden_size=c.hidden_size,
            num_layers=num_layers,
            num_heads=c.num_attention_heads,
            rms_norm_eps=c.rms_norm_eps,
            tie_word_embeddings=bool(c.tie_word_embeddings),
            hidden_activation=c.hidden_activation,
            sliding_window=c.sliding_window if "sliding_attention" in layer_types else None,
            final_logit_softcapping=c.final_logit_softcapping,
            layers=tuple(layers),
            enable_moe_block=moe,
            num_experts=c.num_experts if moe else 0,
            top_k_experts=c.top_k_experts if moe else 0,
            moe_intermediate_size=c.moe_intermediate_size if moe else 0,
            hidden_size_per_layer_input=ple,
            vocab_size_per_layer_input=c.vocab_size_per_layer_input if ple else 0,
            placeholder_token_ids=placeholders,
            pad_token_id=c.pad_token_id or 0,
            # A text-only checkpoint has no soft tokens: "vision" is then plain causal attention.
            bidirectional_vision=c.use_bidirectional_attention == "vision" and bool(vision),
            vision_token_ids=vision,
        )
