"""Drive a jaxllm model the way tpu-inference's runner does, with hand-built metadata.

`Engine` owns the model, a paged KV cache per layer (in shuffled slots of the
cache list, on shuffled pages) and the per-request state, so tests can run
prefill, decode and ragged mixed steps and compare the logits of every token with
Hugging Face's full forward over the same sequence.
"""

from __future__ import annotations

import dataclasses
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx
from vllm.config import ModelConfig, VllmConfig

from jaxllm.model.driver import allocate_caches, attention_metadata, jitted_step

PAGE_SIZE = 8


def auto_mesh(model_parallel: int = 1):
    devices = jax.devices()[:model_parallel]
    return jax.sharding.Mesh(np.array(devices).reshape(1, model_parallel), ("data", "model"),
                             axis_types=(jax.sharding.AxisType.Auto,) * 2)


def vllm_config(path, dtype="float32", max_model_len=256) -> VllmConfig:
    return VllmConfig(model_config=ModelConfig(model=str(path), dtype=dtype, max_model_len=max_model_len))


def load_model(cls, path, *, mesh=None, dtype="float32", max_model_len=256, moe=None):
    """Build abstractly and load the checkpoint, as tpu-inference's loader does.

    `moe`: the model's `MoESetup` (default: what vLLM's flags give, the routed path off TPU)."""
    mesh = mesh or auto_mesh()
    config = vllm_config(path, dtype, max_model_len)
    with jax.set_mesh(mesh):
        model = nnx.eval_shape(lambda: cls(config, jax.random.key(0), mesh, moe=moe))
        model.load_weights(jax.random.key(0))
    return model, mesh


def broken_copy(checkpoint, tmp_path, edit, name="broken"):
    """A copy of `checkpoint` whose tensors `edit(dict)` has changed in place (removed, reshaped, added)."""
    from safetensors.torch import load_file, save_file

    out = tmp_path / name
    shutil.copytree(checkpoint, out, ignore=shutil.ignore_patterns("model.safetensors"))
    # Read from the source: the tensors may map the file, which must not be rewritten under them.
    tensors = load_file(checkpoint / "model.safetensors")
    edit(tensors)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


def hf_logits(path, ids, auto_class=None) -> np.ndarray:
    """HF transformers' fp32 logits for every position of one sequence (full forward, no cache)."""
    from transformers import AutoModelForCausalLM

    model = (auto_class or AutoModelForCausalLM).from_pretrained(str(path), dtype=torch.float32)
    with torch.no_grad():
        return model(torch.tensor([ids]), use_cache=False).logits[0].float().numpy()


@dataclasses.dataclass
class Request:
    tokens: list[int]
    pages: list[int]
    computed: int = 0  # tokens already in the cache


class Engine:
    def __init__(self, model, mesh, *, num_pages=64, max_reqs=4, pages_per_req=16, seed=0,
                 cache_specs=None, kv_share=None, cache_dtype=None):
        """`cache_specs`: per layer (num_kv_heads, head_dim); defaults to the model config's.

        `kv_share`: {shared layer: donor layer}, by default the config's. As tpu-inference's
        runner does, a shared layer gets no cache of its own: its name maps to the donor's
        slot, and grouped metadata has no entry for it.
        """
        self.model, self.mesh = model, mesh
        self.rng = np.random.default_rng(seed)
        layers = model.config.kv_layers()
        rows = cache_specs or [(layer.num_kv_heads, layer.head_dim) for layer in layers]
        if kv_share is None and cache_specs is None:
            kv_share = {i: layer.kv_donor for i, layer in enumerate(layers) if layer.kv_donor is not None}
        self.kv_share = dict(kv_share or {})
        # Each layer gets its own slot, shuffled so that list order != layer order.
        slot_order = self.rng.permutation(len(rows) - len(self.kv_share))
        self.caches, self.layer_slots = allocate_caches(rows, self.kv_share, cache_dtype or model.dtype,
                                                        num_pages=num_pages,
                                                        page_size=PAGE_SIZE, slot_order=slot_order)
        self.free_pages = list(self.rng.permutation(num_pages))
        self.max_reqs, self.pages_per_req = max_reqs, pages_per_req
        self.requests: list[Request] = []
        self._state = nnx.state(model)
        self._step = jitted_step(model, self.layer_slots, donate_caches=False)

    def add(self, tokens) -> Request:
        request = Request(list(tokens), [int(self.free_pages.pop()) for _ in range(self.pages_per_req)])
        self.requests.append(request)
        return request

    def step(self, schedule: list[tuple[Request, int]], pad_to: int | None = None,
             grouped: bool = False, embed=None) -> list[np.ndarray]:
        """Run one step; `schedule` lists (request, new tokens) with decodes first. Returns logits per request.

        `grouped` passes the metadata as tpu-inference does with several KV-cache
        groups: a dict keyed by layer name. `embed(ids) -> [T, D]`: the step gets these
        embeddings beside the ids, as the runner gives a multimodal step.
        """
        num_tokens = sum(n for _, n in schedule)
        ids = np.zeros(pad_to or num_tokens, np.int32)
        at = 0
        for request, n in schedule:
            ids[at:at + n] = request.tokens[request.computed:request.computed + n]
            at += n
        metadata = attention_metadata([n for _, n in schedule], [r.computed + n for r, n in schedule],
                                      np.array([r.pages for r, _ in schedule]), max_reqs=self.max_reqs,
                                      num_tokens=len(ids))
        if grouped:
            metadata = {f"layer.{i}": metadata for i in range(len(self.layer_slots)) if i not in self.kv_share}
        with jax.set_mesh(self.mesh):
            embeds = None if embed is None else embed(jnp.asarray(ids))
            self.caches, logits = self._step(self._state, self.caches, jnp.asarray(ids), metadata, None, embeds)
        logits = np.asarray(logits)
        out, at = [], 0
        for request, n in schedule:
            out.append(logits[at:at + n])
            request.computed += n
            at += n
        return out
