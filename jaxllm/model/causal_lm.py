"""What Llama 4 and Gemma 4 share: tpu-inference's model contract.

- `__init__(vllm_config, rng_key, mesh)` only creates parameters (random, so that
  `load_format="dummy"` works, and abstract under `nnx.eval_shape`);
- `__call__(kv_caches, input_ids, attention_metadata, ...)` runs the layers in
  an unrolled Python loop, each layer reading and writing its own slot of the
  cache list, and returns `(kv_caches, hidden_states, [], None)`;
- `compute_logits(hidden)` projects only the rows the runner selected;
- `load_weights(rng_key)` streams the HF checkpoint into the parameters;
- multimodal checkpoints (`image_encoder_class` set) add what tpu-inference's runner
  calls for them: `embed_multimodal(**processor_outputs)` gives each image's features,
  `embed_input_ids(input_ids, features, is_multimodal=mask)` puts them in place of the
  image's placeholder tokens, and `precompile_vision_encoder` compiles the encoder at
  warm-up. With every image limit at 0 (`--limit-mm-per-prompt`), no encoder is built.
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
from jaxllm.model.mlp import Experts, MoESetup
from jaxllm.model.params import param
from jaxllm.model.weights import Rule, checkpoint_tensors, load_checkpoint, transpose


def takes_images(model_config) -> bool:
    """Whether vLLM will send this model images: a multimodal checkpoint whose image limit isn't 0."""
    mm = model_config.multimodal_config
    return mm is not None and mm.get_limit_per_prompt("image") > 0


@dataclasses.dataclass(frozen=True, eq=False)
class _ByIdentity:
    """A value kept as static module state but compared and hashed by identity: nnx compares static
    state between graphs, and vLLM's config holds transformers' per-layer configs, whose `==` raises."""
    value: object


def merge_heads(out: jax.Array, o_proj: jax.Array) -> jax.Array:
    """The attention output projection, "TNH,NHD->TD", contracting N then H as they lie in memory.

    `jnp.einsum` lists contracted axes alphabetically (H, N); XLA's CPU backend then
    transposes both operands, which copies the whole o_proj weight at every step.
    """
    return jax.lax.dot_general(out, o_proj, (((1, 2), (0, 1)), ((), ())))


class CausalLM(nnx.Module):
    config_class: type                         # a dataclass with `from_hf(hf_config)`
    checkpoint_prefixes: tuple[str, ...] = ()  # stripped from tensor names (multimodal checkpoints)
    skipped_prefixes: tuple[str, ...] = ()     # tensors of parts we don't run (audio)
    image_encoder_class: type | None = None    # multimodal checkpoints: `jaxllm.model.vision` encoder
    image_prefixes: tuple[str, ...] = ()       # its tensors (after stripping), skipped when it isn't built
    unserved_modalities: tuple[str, ...] = ()  # what vLLM's processor takes but we don't (refused per request)
    needs_token_ids = False                    # __call__ needs input_ids even with inputs_embeds

    @classmethod
    def attends_within_images(cls, hf_config) -> bool:
        """Whether an image's tokens attend to each other ahead, so that an image must be in one step."""
        return False

    def __init__(self, vllm_config, rng_key: jax.Array, mesh: Mesh, moe: MoESetup | None = None):
        """`moe`: how the experts are laid out and run; by default what vLLM's flags ask for
        (tests and benchmarks pass their own, e.g. the dense reference)."""
        model_config = vllm_config.model_config
        if vllm_config.parallel_config.pipeline_parallel_size > 1:
            raise NotImplementedError(f"{type(self).__name__} does not support pipeline parallelism")
        self._vllm_config = _ByIdentity(vllm_config)
        self.mesh = mesh
        self.moe = moe or MoESetup.for_serving(vllm_config, mesh)
        self.config = config = self.config_class.from_hf(model_config.hf_config)
        self.dtype = dtype = to_jax_dtype(model_config.dtype)
        rngs = nnx.Rngs(rng_key)
        self.embed = param(rngs, (config.vocab_size, config.hidden_size), dtype, (Axis.MLP_TENSOR, None))
        if not config.tie_word_embeddings:
            self.lm_head = param(rngs, (config.hidden_size, config.vocab_size), dtype, (None, Axis.MLP_TENSOR))
        self.build(config, dtype, mesh, rngs, model_config.max_model_len)
        encoder = self.image_encoder_class
        if encoder is not None and takes_images(model_config):
            self.vision = encoder(encoder.config_class.from_hf(model_config.hf_config), dtype, mesh, rngs)
        else:
            self.vision = None
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

    def embed_input_ids(self, input_ids: jax.Array, multimodal_embeddings: jax.Array | None = None, *,
                        is_multimodal: jax.Array | None = None) -> jax.Array:
        """[T, D] embeddings: each token's, and where `is_multimodal` [T], the next row of
        `multimodal_embeddings` [>= its count, D] (the runner's features, in prompt order)."""
        x = self.embed_tokens(input_ids)
        if multimodal_embeddings is None or is_multimodal is None:
            return x
        row = jnp.clip(jnp.cumsum(is_multimodal) - 1, 0, multimodal_embeddings.shape[0] - 1)
        return jnp.where(is_multimodal[:, None], multimodal_embeddings[row].astype(x.dtype), x)

    def embed_multimodal(self, **processor_outputs) -> list[jax.Array]:
        """The features of each image in vLLM's processor outputs, [placeholders of the image, D] each."""
        if self.vision is None:
            raise ValueError(f"{type(self).__name__} was started without image input (every image limit of "
                             "--limit-mm-per-prompt is 0)")
        return self.vision.encode_images(**processor_outputs)

    def precompile_vision_encoder(self, run_compilation) -> None:
        """Compile the image encoder for the one input shape it is called with (tpu-inference's warm-up)."""
        inputs = None if self.vision is None else self.vision.warmup_inputs()
        if inputs is not None:
            run_compilation("jaxllm image encoder", self.embed_multimodal, call_kwargs=inputs, aot=False)

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

    def live_tokens(self, attention_metadata, num_tokens: int) -> jax.Array | None:
        """[T]: True for the step's tokens, False for the padding the runner adds after them to reach
        its token bucket. The runner counts a step's requests in `request_distribution[2]` and fills
        `query_start_loc` past the last request with the token total, so this reads the total.

        None (every token live) where the live tokens are not a prefix: with attention data
        parallelism each rank's share is padded on its own, and prefill context parallelism
        (`pcp`) permutes the tokens into rank order.
        """
        if get_mesh_shape_product(self.mesh, Axis.ATTN_DATA) > 1:
            return None
        md = attention_metadata
        if isinstance(md, dict):  # several KV-cache groups: the same requests and tokens in each
            md = next(iter(md.values()))
        if getattr(md, "pcp", None) is not None:
            return None
        return jnp.arange(num_tokens) < md.query_start_loc[md.request_distribution[2]]

    def compute_logits(self, hidden_states: jax.Array) -> jax.Array:
        if self.config.tie_word_embeddings:
            return jnp.einsum("TD,VD->TV", hidden_states, self.embed[...])
        return jnp.einsum("TD,DV->TV", hidden_states, self.lm_head[...])

    def load_weights(self, rng_key: jax.Array) -> None:
        """Stream the checkpoint in through vLLM's loader (`--load-format`, `--download-dir`, `--revision`)."""
        rules, skipped = self.checkpoint_rules(), self.skipped_prefixes
        if self.vision is None:
            skipped += self.image_prefixes
        else:
            rules += [dataclasses.replace(rule, targets=tuple(f"vision.{t}" for t in rule.targets))
                      for rule in self.vision.checkpoint_rules()]
        load_checkpoint(self, checkpoint_tensors(self.vllm_config, self), rules, mesh=self.mesh,
                        dtype=self.dtype, checkpoint=self.vllm_config.model_config.model,
                        strip_prefixes=self.checkpoint_prefixes, skip_prefixes=skipped)

    def modules(self):
        # vLLM walks `model.modules()` at shutdown as if this were a torch module.
        return iter(())
