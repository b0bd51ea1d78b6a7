"""What Llama 4 and Gemma 4 share: tpu-inference's model contract.

- `__init__(vllm_config, rng_key, mesh)` only creates parameters (random, so that
  `load_format="dummy"` works, and abstract under `nnx.eval_shape`);
- `__call__(kv_caches, input_ids, attention_metadata, ...)` runs the layers in
  an unrolled Python loop, each layer reading and writing its own slot of the
  cache list, and returns `(kv_caches, hidden_states, [], None)`;
- `compute_logits(hidden)` projects only the rows the runner selected;
- `load_weights(rng_key)` streams the HF checkpoint into the parameters.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh
from tpu_inference.layers.common.sharding import ShardingAxisName as Axis
from tpu_inference.utils import get_mesh_shape_product, to_jax_dtype

from jaxllm.attention.dispatch import on_tpu  # stand-in for jaxllm.platform.on_tpu
from jaxllm.model.params import param
from jaxllm.model.weights import Rule, load_checkpoint, resolve_model_dir, transpose


def merge_heads(out: jax.Array, o_proj: jax.Array) -> jax.Array:
    """The attention output projection, "TNH,NHD->TD", contracting N then H as they lie in memory.

    `jnp.einsum` lists contracted axes alphabetically (H, N); XLA's CPU backend then
    transposes both operands, which copies the whole o_proj weight at every step.
    """
    return jax.lax.dot_general(out, o_proj, (((1, 2), (0, 1)), ((), ())))


class CausalLM(nnx.Module):
    config_class: type                         # a dataclass with `from_hf(hf_config)`
    checkpoint_prefixes: tuple[str, ...] = ()  # stripped from tensor names (multimodal checkpoints)
    skipped_prefixes: tuple[str, ...] = ()     # tensors of parts we don't run (vision, audio)

    def __init__(self, vllm_config, rng_key: jax.Array, mesh: Mesh):
        model_config = vllm_config.model_config
        if vllm_config.parallel_config.pipeline_parallel_size > 1:
            raise NotImplementedError(f"{type(self).__name__} does not support pipeline parallelism")
        # Only plain values as static module state: nnx compares it between graphs, and
        # transformers' per-layer (heterogeneous) configs such as Gemma 4's raise on `==`.
        self.model_source = (model_config.model, model_config.revision)
        self.mesh = mesh
        self.config = config = self.config_class.from_hf(model_config.hf_config)
        self.dtype = dtype = to_jax_dtype(model_config.dtype)
        rngs = nnx.Rngs(rng_key)
        self.embed = param(rngs, (config.vocab_size, config.hidden_size), dtype, (Axis.MLP_TENSOR, None))
        if not config.tie_word_embeddings:
            self.lm_head = param(rngs, (config.hidden_size, config.vocab_size), dtype, (None, Axis.MLP_TENSOR))
        self.build(config, dtype, mesh, rngs, model_config.max_model_len)

    def build(self, config, dtype, mesh: Mesh, rngs: nnx.Rngs, max_model_len: int) -> None:
        """Create the layers and the final norm."""
        raise NotImplementedError

    def checkpoint_rules(self) -> list[Rule]:
        raise NotImplementedError

    @staticmethod
    def kv_head_sharding(num_kv_heads: int, mesh: Mesh):
        """Shard KV heads over the tensor axis when they divide evenly; else replicate them (GQA with TP > K)."""
        tp = get_mesh_shape_product(mesh, Axis.ATTN_HEAD)
        return Axis.ATTN_HEAD if num_kv_heads % tp == 0 else None

    def embedding_rules(self, embed_pattern: str = r"model\.embed_tokens\.weight") -> list[Rule]:
        rules = [Rule(embed_pattern, ("embed",))]
        if self.config.tie_word_embeddings:
            return rules + [Rule(r"lm_head\.weight", (), lambda w: ())]  # a saved copy of the tied embedding
        return rules + [Rule(r"lm_head\.weight", ("lm_head",), transpose)]

    def embed_tokens(self, input_ids: jax.Array) -> jax.Array:
        return jnp.take(self.embed[...], input_ids, axis=0)

    @staticmethod
    def layer_cache(i: int, layer_name_to_kvcache_index, attention_metadata, metadata_layer: int | None = None):
        """(slot in the cache list, attention metadata) of layer i.

        The cache list is not in layer order (and KV-shared layers point at their
        donor's slot), so the slot always comes from the runner's map. With several
        KV-cache groups the metadata is a dict keyed like the map; a KV-shared layer
        belongs to no group, so it passes its donor as `metadata_layer`.
        """
        name = f"layer.{i}"
        slot = dict(layer_name_to_kvcache_index)[name]
        if isinstance(attention_metadata, dict):
            return slot, attention_metadata[f"layer.{i if metadata_layer is None else metadata_layer}"]
        return slot, attention_metadata

    @staticmethod
    def pad_lone_token(input_ids, inputs_embeds, attention_metadata):
        """(tokens, inputs) with a step of one token given a copy of it as padding, off TPU.

        XLA's CPU backend has no bf16 matrix-vector product: a dot with a single row
        first converts the whole weight matrix to fp32, and its scheduler starts every
        layer's conversions at once (a one-token step of Gemma 4 31B-2-layer shapes held
        9 GiB of fp32 weight copies). From two rows on, its matrix-matrix kernel reads
        bf16 weights as they are. The copy is padding for the attention (the batch's
        `query_start_loc` ends before it): it writes no KV and its output is dropped;
        being the same token, it picks the same experts. The runner pads steps to 16
        tokens, so this only changes direct callers (benchmarks, tests).
        """
        tokens = (input_ids if inputs_embeds is None else inputs_embeds).shape[0]
        if tokens != 1 or on_tpu():
            return tokens, (input_ids, inputs_embeds, attention_metadata)
        twice = lambda a: None if a is None else jnp.concatenate([a, a])  # noqa: E731
        pad = lambda md: dataclasses.replace(md, input_positions=twice(md.input_positions))  # noqa: E731
        metadata = ({name: pad(md) for name, md in attention_metadata.items()}
                    if isinstance(attention_metadata, dict) else pad(attention_metadata))
        return tokens, (twice(input_ids), twice(inputs_embeds), metadata)

    def compute_logits(self, hidden_states: jax.Array) -> jax.Array:
        rows = hidden_states.shape[0]
        if rows == 1 and not on_tpu():  # one row: see `pad_lone_token` (the vocabulary in fp32: 5.3 GiB)
            return self.compute_logits(jnp.concatenate([hidden_states, hidden_states]))[:1]
        if self.config.tie_word_embeddings:
            return jnp.einsum("TD,VD->TV", hidden_states, self.embed[...])
        return jnp.einsum("TD,DV->TV", hidden_states, self.lm_head[...])

    def load_weights(self, rng_key: jax.Array) -> None:
        model_dir = resolve_model_dir(*self.model_source)
        load_checkpoint(self, model_dir, self.checkpoint_rules(), mesh=self.mesh, dtype=self.dtype,
                        strip_prefixes=self.checkpoint_prefixes, skip_prefixes=self.skipped_prefixes)

    def modules(self):
        # vLLM walks `model.modules()` at shutdown as if this were a torch module.
        return iter(())
