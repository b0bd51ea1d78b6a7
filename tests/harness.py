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
from tpu_inference.layers.common.attention_metadata import AttentionMetadata
from vllm.config import ModelConfig, VllmConfig

from jaxllm.attention import CacheLayout

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


def broken_copy(checkpoint, tmp_path, edit):
    """A copy of `checkpoint` whose tensors `edit(dict)` has changed (removed, reshaped, added)."""
    from safetensors.torch import load_file, save_file

    out = tmp_path / "broken"
    shutil.copytree(checkpoint, out)
    tensors = load_file(out / "model.safetensors")
    edit(tensors)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


def hf_logits(path, ids, auto_class=None) -> np.ndarray:
    """HF transformers' fp32 logits for every position of one sequence (full forward, no cache)."""
    from transformers import AutoModelForCausalLM

    model = (auto_class or AutoModelForCausalLM).from_pretrained(str(path), dtype=torch.float32)
    with torch.no_grad():
        return model(torch.tensor([ids]), use_cache=False).logits[0].float().numpy()


def _jitted_step(model, layer_slots):
    """The runner's step as one jitted function (as tpu-inference jits it), logits for every token."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def step(state, caches, ids, metadata):
        m = nnx.merge(graphdef, state)
        caches, hidden, _, _ = m(caches, ids, metadata, None, None, layer_slots)
        return caches, m.compute_logits(hidden)

    return lambda caches, ids, metadata: step(state, caches, ids, metadata)


@dataclasses.dataclass
class Request:
    tokens: list[int]
    pages: list[int]
    computed: int = 0  # tokens already in the cache


class Engine:
    def __init__(self, model, mesh, *, num_pages=64, max_reqs=4, pages_per_req=16, seed=0,
                 cache_specs=None, kv_share=None):
        """`cache_specs`: per layer (num_kv_heads, head_dim); defaults to the model config's.

        `kv_share`: {shared layer: donor layer}. As tpu-inference's runner does, a shared
        layer gets no cache of its own: its name maps to the donor's slot, and grouped
        metadata has no entry for it.
        """
        self.model, self.mesh = model, mesh
        self.rng = np.random.default_rng(seed)
        c = model.config
        specs = cache_specs or [(c.num_kv_heads, c.head_dim)] * c.num_layers
        self.kv_share = dict(kv_share or {})
        owners = [i for i in range(len(specs)) if i not in self.kv_share]
        dtype = model.dtype
        packing = 4 // jnp.dtype(dtype).itemsize
        # Each layer gets its own slot, shuffled so that list order != layer order.
        slots = self.rng.permutation(len(owners))
        slot_of = {layer: int(slots[n]) for n, layer in enumerate(owners)}
        slot_of.update({shared: slot_of[donor] for shared, donor in self.kv_share.items()})
        self.layer_slots = tuple((f"layer.{i}", slot_of[i]) for i in range(len(specs)))
        self.caches = [None] * len(owners)
        for i in owners:
            kv_heads, head_dim = specs[i]
            shape = CacheLayout(kv_heads, head_dim, packing).cache_shape(num_pages, PAGE_SIZE)
            self.caches[slot_of[i]] = jnp.zeros(shape, dtype)
        self.free_pages = list(self.rng.permutation(num_pages))
        self.max_reqs, self.pages_per_req = max_reqs, pages_per_req
        self.requests: list[Request] = []
        self._step = _jitted_step(model, self.layer_slots)

    def add(self, tokens) -> Request:
        request = Request(list(tokens), [int(self.free_pages.pop()) for _ in range(self.pages_per_req)])
        self.requests.append(request)
        return request

    def step(self, schedule: list[tuple[Request, int]], pad_to: int | None = None,
             grouped: bool = False) -> list[np.ndarray]:
        """Run one step; `schedule` lists (request, new tokens) with decodes first. Returns logits per request.

        `grouped` passes the metadata as tpu-inference does with several KV-cache
        groups: a dict keyed by layer name.
        """
        num_tokens = sum(n for _, n in schedule)
        padded = pad_to or num_tokens
        ids = np.zeros(padded, np.int32)
        positions = np.zeros(padded, np.int32)
        cu = np.zeros(self.max_reqs + 1, np.int32)
        kv_lens = np.zeros(self.max_reqs, np.int32)
        tables = np.zeros((self.max_reqs, self.pages_per_req), np.int32)
        at = 0
        for r, (request, n) in enumerate(schedule):
            start = request.computed
            ids[at:at + n] = request.tokens[start:start + n]
            positions[at:at + n] = np.arange(start, start + n)
            at += n
            cu[r + 1] = at
            kv_lens[r] = start + n
            tables[r] = request.pages
        cu[len(schedule) + 1:] = at
        num_decode = 0
        while num_decode < len(schedule) and schedule[num_decode][1] == 1:
            num_decode += 1
        metadata = AttentionMetadata(
            input_positions=jnp.asarray(positions), block_tables=jnp.asarray(tables.reshape(-1)),
            seq_lens=jnp.asarray(kv_lens), query_start_loc=jnp.asarray(cu),
            request_distribution=jnp.asarray([num_decode, num_decode, len(schedule)], jnp.int32))
        if grouped:
            metadata = {f"layer.{i}": metadata for i in range(len(self.layer_slots)) if i not in self.kv_share}
        with jax.set_mesh(self.mesh):
            self.caches, logits = self._step(self.caches, jnp.asarray(ids), metadata)
        logits = np.asarray(logits)
        out, at = [], 0
        for request, n in schedule:
            out.append(logits[at:at + n])
            request.computed += n
            at += n
        return out
