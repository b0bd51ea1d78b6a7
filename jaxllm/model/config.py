"""Model configs, read once from the Hugging Face config into small typed dataclasses.

Every knob the model uses comes from here; nothing about an architecture is a
constant in the model code. Features we don't implement are refused at startup
with the field named, never silently ignored.
"""

from __future__ import annotations

import dataclasses

from jaxllm.model.rope import rope_frequencies


class UnsupportedConfigError(ValueError):
    """The checkpoint's config asks for something jaxllm does not implement."""


def text_config(hf_config):
    """The language model's config: `text_config` of a multimodal checkpoint, else the config itself."""
    return getattr(hf_config, "text_config", None) or hf_config


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise UnsupportedConfigError(message)


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

    @classmethod
    def from_hf(cls, hf_config) -> "Llama4Config":
        c = text_config(hf_config)
        _require(c.hidden_act == "silu", f"Llama 4 hidden_act={c.hidden_act!r}: only 'silu' is supported")
        _require(not c.attention_bias, "Llama 4 attention_bias=True is not supported")
        rope_layers = tuple(bool(flag) for flag in c.no_rope_layers)
        _require(len(rope_layers) == c.num_hidden_layers,
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
        )
