"""Run one of our models outside vLLM, the way tpu-inference's runner calls it.

The model is built with random weights straight from a checkpoint's config (no
weights are read), gets a paged KV cache per layer (KV-shared layers point at
their donor's slot) and is stepped by one jitted function with the caches
donated, as the runner does. The step returns the logits of the rows asked for
(`logits_rows`, the runner's deferred logits) or of every token.
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tpu_inference.layers.common.attention_metadata import AttentionMetadata
from vllm.config import ModelConfig, VllmConfig

from jaxllm.attention import CacheLayout

PAGE_SIZE = 16


def model_class(checkpoint: str):
    import json
    from pathlib import Path

    from jaxllm.vllm_plugin.models import DEFAULT_FOR, our_models

    arch = json.loads((Path(checkpoint) / "config.json").read_text())["architectures"][0]
    return our_models()[DEFAULT_FOR.get(arch, arch)]


def build_model(checkpoint: str, max_model_len: int, dtype: str = "float32"):
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "model"),
                             axis_types=(jax.sharding.AxisType.Auto,) * 2)
    config = VllmConfig(model_config=ModelConfig(model=checkpoint, dtype=dtype, max_model_len=max_model_len,
                                                 skip_tokenizer_init=True))
    with jax.set_mesh(mesh):
        model = model_class(checkpoint)(config, jax.random.key(0), mesh)
    return model, mesh


class Stepper:
    """Caches, metadata and the jitted step for `max_reqs` requests of up to `max_model_len` tokens."""

    def __init__(self, model, mesh, max_reqs: int, max_model_len: int):
        self.model, self.mesh = model, mesh
        self.max_reqs = max_reqs
        self.pages_per_req = -(-max_model_len // PAGE_SIZE)
        num_pages = max_reqs * self.pages_per_req
        packing = 4 // jnp.dtype(model.dtype).itemsize
        specs = model.config.kv_layers()
        owners = [i for i, s in enumerate(specs) if s.kv_donor is None]
        slot_of = {layer: n for n, layer in enumerate(owners)}
        slot_of.update({i: slot_of[s.kv_donor] for i, s in enumerate(specs) if s.kv_donor is not None})
        self.layer_slots = tuple((f"layer.{i}", slot_of[i]) for i in range(len(specs)))
        self.cache_shapes = [CacheLayout(specs[i].num_kv_heads, specs[i].head_dim, packing).cache_shape(
            num_pages, PAGE_SIZE) for i in owners]
        self.caches = [jnp.zeros(shape, model.dtype) for shape in self.cache_shapes]
        self.block_tables = np.arange(num_pages, dtype=np.int32)
        self.graphdef, self.state = nnx.split(model)
        self._steps = {}

    def step_fn(self, all_logits: bool):
        """jit(state, caches, ids, metadata, logits_rows) -> (caches, logits), caches donated."""
        if all_logits not in self._steps:
            graphdef, slots = self.graphdef, self.layer_slots

            def step(state, caches, ids, metadata, logits_rows):
                m = nnx.merge(graphdef, state)
                caches, hidden, _, _ = m(caches, ids, metadata, None, None, slots)
                return caches, m.compute_logits(hidden if all_logits else hidden[logits_rows])

            self._steps[all_logits] = jax.jit(step, donate_argnums=1)
        return self._steps[all_logits]

    def inputs(self, q_lens: list[int], context: int):
        """Ids, metadata and last-token rows for requests of `q_lens` new tokens ending at `context` tokens."""
        total = sum(q_lens)
        positions = np.concatenate([np.arange(context - n, context) for n in q_lens]).astype(np.int32)
        cu = np.full(self.max_reqs + 1, total, np.int32)
        cu[:len(q_lens) + 1] = np.concatenate([[0], np.cumsum(q_lens)])
        kv_lens = np.zeros(self.max_reqs, np.int32)
        kv_lens[:len(q_lens)] = context
        decodes = sum(1 for n in q_lens if n == 1)
        metadata = AttentionMetadata(
            input_positions=jnp.asarray(positions), block_tables=jnp.asarray(self.block_tables),
            seq_lens=jnp.asarray(kv_lens), query_start_loc=jnp.asarray(cu),
            request_distribution=jnp.asarray([decodes, decodes, len(q_lens)], jnp.int32))
        ids = jnp.asarray(np.random.default_rng(0).integers(10, 1000, total).astype(np.int32))
        return ids, metadata, jnp.asarray(cu[1:len(q_lens) + 1] - 1)

    def compiled(self, all_logits: bool, q_lens: list[int], context: int):
        with jax.set_mesh(self.mesh):
            return self.step_fn(all_logits).lower(self.state, self.caches, *self.inputs(q_lens, context)).compile()

    def run(self, all_logits: bool, inputs):
        with jax.set_mesh(self.mesh):
            self.caches, logits = self.step_fn(all_logits)(self.state, self.caches, *inputs)
        return jax.block_until_ready(logits)
