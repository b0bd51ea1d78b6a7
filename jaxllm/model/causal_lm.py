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

from jaxllm.model import quantization
from jaxllm.model.mlp import Experts
from jaxllm.model.params import param
from jaxllm.model.weights import Rule, checkpoint_tensors, load_checkpoint, transpose


@dataclasses.dataclass(frozen=True, eq=False)
class _ByIdentity:
    """A value kept as static module state but compared and hashed by identity: nnx compares static
    state between graphs, and vLLM's config holds transformers' per-layer configs, whose `==` raises."""
    value: object


class CausalLM(nnx.Module):
    config_class: type                         # a dataclass with `from_hf(hf_config)`
    checkpoint_prefixes: tuple[str, ...] = ()  # stripped from tensor names (multimodal checkpoints)
    skipped_prefixes: tuple[str, ...] = ()     # tensors of parts we don't run (vision, audio)

    def __init__(self, vllm_config, rng_key: jax.Array, mesh: Mesh):
        model_config = vllm_config.model_config
        if vllm_config.parallel_config.pipeline_parallel_size > 1:
            raise NotImplementedError(f"{type(self).__name__} does not support pipeline parallelism")
        self._vllm_config = _ByIdentity(vllm_config)
        self.mesh = mesh
        self.config = config = self.config_class.from_hf(model_config.hf_config)
        self.dtype = dtype = to_jax_dtype(model_config.dtype)
        rngs = nnx.Rngs(rng_key)
        self.embed = param(rngs, (config.vocab_size, config.hidden_size), dtype, (Axis.MLP_TENSOR, None))
        if not config.tie_word_embeddings:
            self.lm_head = param(rngs, (config.hidden_size, config.vocab_size), dtype, (None, Axis.MLP_TENSOR))
        self.build(config, dtype, mesh, rngs, model_config.max_model_len)
        if getattr(config, "fp8_experts", None) is not None:  # an FP8 checkpoint: experts as it stores them
            for _, module in nnx.iter_modules(self):
                if isinstance(module, Experts):
                    quantization.use_fp8_weights(module, rngs)

    @property
    def vllm_config(self):
        """vLLM's engine config, as tpu-inference's models keep it (its loaders and Qwix read it)."""
        return self._vllm_config.value

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
        if layer_name_to_kvcache_index is None:
            # tpu-inference's Qwix calibration call (qwix_utils.qwix_quantize_nnx_model) passes no map
            # and one cache per layer, in layer order.
            slot = i
        else:
            slot = dict(layer_name_to_kvcache_index)[name]
        if isinstance(attention_metadata, dict):
            return slot, attention_metadata[f"layer.{i if metadata_layer is None else metadata_layer}"]
        return slot, attention_metadata

    def compute_logits(self, hidden_states: jax.Array) -> jax.Array:
        if self.config.tie_word_embeddings:
            return jnp.einsum("TD,VD->TV", hidden_states, self.embed[...])
        return jnp.einsum("TD,DV->TV", hidden_states, self.lm_head[...])

    def load_weights(self, rng_key: jax.Array) -> None:
        """Stream the checkpoint in through vLLM's loader (`--load-format`, `--download-dir`, `--revision`)."""
        load_checkpoint(self, checkpoint_tensors(self.vllm_config, self), self.checkpoint_rules(), mesh=self.mesh,
                        dtype=self.dtype, checkpoint=self.vllm_config.model_config.model,
                        strip_prefixes=self.checkpoint_prefixes, skip_prefixes=self.skipped_prefixes)

    def modules(self):
        # vLLM walks `model.modules()` at shutdown as if this were a torch module.
        return iter(())
