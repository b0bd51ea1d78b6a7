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
from vllm.config import ModelConfig, VllmConfig

from jaxllm.model.driver import allocate_caches, attention_metadata, jitted_step

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
        pages_per_req = -(-max_model_len // PAGE_SIZE)
        layers = model.config.kv_layers()
        rows = [(layer.num_kv_heads, layer.head_dim) for layer in layers]
        kv_share = {i: layer.kv_donor for i, layer in enumerate(layers) if layer.kv_donor is not None}
        self.caches, self.layer_slots = allocate_caches(rows, kv_share, model.dtype,
                                                        num_pages=max_reqs * pages_per_req, page_size=PAGE_SIZE)
        self.cache_shapes = [cache.shape for cache in self.caches]
        self.page_tables = np.arange(max_reqs * pages_per_req, dtype=np.int32).reshape(max_reqs, pages_per_req)
        self.state = nnx.state(model)
        self.step = jitted_step(model, self.layer_slots, donate_caches=True)

    def inputs(self, q_lens: list[int], context: int, num_tokens: int | None = None, num_rows: int | None = None):
        """Ids, metadata and last-token rows for requests of `q_lens` new tokens ending at `context` tokens.

        `num_tokens` / `num_rows`: pad the tokens / logits rows to that many, as the runner pads
        them to its buckets (padding tokens are id 0 after the last request; padding rows repeat row 0).
        """
        total = sum(q_lens)
        num_tokens = num_tokens or total
        metadata = attention_metadata(q_lens, [context] * len(q_lens), self.page_tables[:len(q_lens)],
                                      max_reqs=self.max_reqs, num_tokens=num_tokens)
        ids = np.zeros(num_tokens, np.int32)
        ids[:total] = np.random.default_rng(0).integers(10, 1000, total)
        rows = np.zeros(num_rows or len(q_lens), np.int32)
        rows[:len(q_lens)] = np.cumsum(q_lens) - 1
        return jnp.asarray(ids), metadata, jnp.asarray(rows)

    def compiled(self, all_logits: bool, q_lens: list[int], context: int, **padding):
        ids, metadata, rows = self.inputs(q_lens, context, **padding)
        with jax.set_mesh(self.mesh):
            return self.step.lower(self.state, self.caches, ids, metadata, None if all_logits else rows).compile()

    def run(self, all_logits: bool, inputs):
        ids, metadata, rows = inputs
        with jax.set_mesh(self.mesh):
            self.caches, logits = self.step(self.state, self.caches, ids, metadata, None if all_logits else rows)
        return jax.block_until_ready(logits)
