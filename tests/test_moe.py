"""Routed experts against the dense reference (every expert on every token), on 1, 2 and 4 devices.

The routed path sorts (token, expert) pairs by expert and runs each chosen expert on
its rows only, under `shard_map`: with tensor parallelism (each device holds every
expert's slice of F) and with expert parallelism (each device holds whole experts).
`dense_experts` computes the same sums with no routing at all, so any pair that is
dropped, sent to the wrong expert or weighted wrongly shows up as an O(1) error;
fp32 summation-order differences are ~1e-6 of the outputs (tolerance 1e-5).

Routings are skewed on purpose: every token on the same expert(s), so one device or
expert gets all the work and the others none; a few experts nobody picks; random.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from harness import PAGE_SIZE, Engine, auto_mesh, load_model
from test_gemma4 import runner_cache_layout
from jaxllm.checkpoints import cached_checkpoint
from jaxllm.model.gemma4 import JaxGemma4ForCausalLM
from jaxllm.model.llama4 import JaxLlama4ForCausalLM
from jaxllm.model.mlp import ACTIVATIONS, ExpertsImpl, MoESetup, chunk_rows, dense_experts, routed_experts

RTOL = 1e-5
EXPERTS, HIDDEN, WIDTH = 8, 32, 64

LAYOUTS = [(1, False), (2, False), (2, True), (4, False), (4, True)]  # (devices, expert parallel)


def layout_id(layout):
    devices, ep = layout
    return f"{devices}dev-{'ep' if ep else 'tp'}"


def arch_layouts(layouts, fast):
    """(name, layout) for each model and layout, as pytest params; those not in `fast` only in `make test-all`."""
    return [pytest.param(name, layout, id=f"{name}-{layout_id(layout)}",
                         marks=() if (name, layout) in fast else pytest.mark.slow)
            for name in ARCHS for layout in layouts]


def routing(kind: str, tokens: int, top_k: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """[T, k] expert indices and positive weights."""
    if kind == "all-on-one":  # every token on the same experts (the last and the first: two devices under EP)
        index = np.tile([EXPERTS - 1, 0, 3][:top_k], (tokens, 1))
    elif kind == "some-unpicked":  # experts 1, 2 and 6 idle
        index = np.stack([rng.choice([0, 3, 4, 5, 7], top_k, replace=False) for _ in range(tokens)])
    else:
        index = np.stack([rng.choice(EXPERTS, top_k, replace=False) for _ in range(tokens)])
    return index.astype(np.int32), rng.uniform(0.1, 1.0, (tokens, top_k)).astype(np.float32)


@pytest.mark.parametrize("layout", LAYOUTS, ids=layout_id)
@pytest.mark.parametrize("tokens", [1, 1024])
@pytest.mark.parametrize("kind", ["all-on-one", "some-unpicked", "random"])
@pytest.mark.parametrize("top_k, weight_inputs", [(1, True), (2, False)], ids=["llama4-like", "gemma4-like"])
def test_routed_matches_dense(layout, tokens, kind, top_k, weight_inputs):
    devices, expert_parallel = layout
    mesh = auto_mesh(devices)
    rng = np.random.default_rng(tokens + top_k)
    x = rng.standard_normal((tokens, HIDDEN)).astype(np.float32)
    index, weight = routing(kind, tokens, top_k, rng)
    gate, up = (rng.standard_normal((EXPERTS, HIDDEN, WIDTH)).astype(np.float32) * HIDDEN ** -0.5 for _ in "gu")
    down = rng.standard_normal((EXPERTS, WIDTH, HIDDEN)).astype(np.float32) * WIDTH ** -0.5
    moe = MoESetup(mesh, expert_parallel)
    edf, efd = (jax.NamedSharding(mesh, jax.P(*spec)) for spec in moe.shardings())
    gate, up, down = jax.device_put(gate, edf), jax.device_put(up, edf), jax.device_put(down, efd)
    act = ACTIVATIONS["silu"]

    routed = jax.jit(lambda *a: routed_experts(*a, act=act, weight_inputs=weight_inputs, moe=moe))
    dense = jax.jit(lambda *a: dense_experts(*a, act=act, weight_inputs=weight_inputs))
    with jax.set_mesh(mesh):
        got = np.asarray(routed(x, index, weight, gate, up, down))
        want = np.asarray(dense(x, index, weight, gate, up, down))
    assert np.abs(want).max() > 0.1
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=RTOL * np.abs(want).max())


@pytest.mark.parametrize("layout", [(1, False), (4, False), (4, True)], ids=layout_id)
@pytest.mark.parametrize("top_k, weight_inputs", [(1, True), (2, False)], ids=["llama4-like", "gemma4-like"])
def test_padding_tokens_run_no_expert(layout, top_k, weight_inputs):
    """The runner pads a step's tokens to its bucket; with `live` False for the padding, the
    experts run the live tokens' chunks only, and the live tokens' outputs are the dense experts'.

    Chunks are counted where they run: the activation reports each call (one per chunk of
    an expert's rows, on each device). The padding tokens pick experts no live token
    picks, so without the mask those experts would run too.
    """
    devices, expert_parallel = layout
    mesh = auto_mesh(devices)
    tokens, live_tokens = 16, 5
    rng = np.random.default_rng(top_k)
    x = rng.standard_normal((tokens, HIDDEN)).astype(np.float32)
    index = np.concatenate([np.stack([rng.choice([0, 1, 4], top_k, replace=False) for _ in range(live_tokens)]),
                            np.stack([rng.choice([2, 3, 6, 7], top_k, replace=False)
                                      for _ in range(tokens - live_tokens)])]).astype(np.int32)
    weight = rng.uniform(0.1, 1.0, (tokens, top_k)).astype(np.float32)
    live = np.arange(tokens) < live_tokens
    gate, up = (rng.standard_normal((EXPERTS, HIDDEN, WIDTH)).astype(np.float32) * HIDDEN ** -0.5 for _ in "gu")
    down = rng.standard_normal((EXPERTS, WIDTH, HIDDEN)).astype(np.float32) * WIDTH ** -0.5
    moe = MoESetup(mesh, expert_parallel)
    edf, efd = (jax.NamedSharding(mesh, jax.P(*spec)) for spec in moe.shardings())
    gate, up, down = jax.device_put(gate, edf), jax.device_put(up, edf), jax.device_put(down, efd)

    chunks_run = []

    def counted_silu(h):
        jax.debug.callback(lambda _: chunks_run.append(1), h[0, 0])
        return ACTIVATIONS["silu"](h)

    def run(live):
        chunks_run.clear()
        routed = jax.jit(lambda *a: routed_experts(*a[:-1], act=counted_silu, weight_inputs=weight_inputs, moe=moe,
                                                   live=a[-1]))
        with jax.set_mesh(mesh):
            out = np.asarray(routed(x, index, weight, gate, up, down, live))
        jax.effects_barrier()
        return out, len(chunks_run)

    def chunks(token_mask):
        """Chunks the experts' rows of these tokens take, summed over the devices that run them."""
        rows = np.bincount(index[token_mask].reshape(-1), minlength=EXPERTS)
        per_expert = -(-rows // chunk_rows(index.size, EXPERTS))
        return int(per_expert.sum()) * (1 if expert_parallel else devices)  # TP: every device runs every expert

    got, ran = run(live)
    _, ran_unmasked = run(np.ones(tokens, bool))
    with jax.set_mesh(mesh):
        want = np.asarray(jax.jit(lambda *a: dense_experts(*a, act=ACTIVATIONS["silu"], weight_inputs=weight_inputs))(
            x[:live_tokens], index[:live_tokens], weight[:live_tokens], gate, up, down))
    assert ran == chunks(live) and ran_unmasked == chunks(np.ones(tokens, bool)) > ran
    np.testing.assert_allclose(got[:live_tokens], want, rtol=RTOL, atol=RTOL * np.abs(want).max())
    assert not got[live_tokens:].any()


def test_live_tokens_are_the_runner_metadata_token_count():
    """`CausalLM.live_tokens`: the first query_start_loc[num_requests] tokens; the same from each KV-cache
    group's metadata; none while precompiling (no requests); None where live tokens are not a prefix."""
    import types

    from jaxllm.model.causal_lm import CausalLM
    from jaxllm.model.driver import attention_metadata

    model = types.SimpleNamespace(mesh=auto_mesh(2))
    md = attention_metadata([1, 1, 5], [10, 20, 30], np.zeros((3, 4), np.int32), max_reqs=8, num_tokens=16)
    want = np.arange(16) < 7
    np.testing.assert_array_equal(CausalLM.live_tokens(model, md, 16), want)
    np.testing.assert_array_equal(CausalLM.live_tokens(model, {"layer.0": md, "layer.1": md}, 16), want)
    idle = dataclasses.replace(md, request_distribution=jnp.zeros(3, jnp.int32))
    assert not np.asarray(CausalLM.live_tokens(model, idle, 16)).any()
    assert CausalLM.live_tokens(model, dataclasses.replace(md, pcp=object()), 16) is None
    attention_dp = jax.sharding.Mesh(np.array(jax.devices()[:2]).reshape(2, 1), ("data", "model"))
    assert CausalLM.live_tokens(types.SimpleNamespace(mesh=attention_dp), md, 16) is None


@pytest.mark.parametrize("experts", [1, 4, 16, 128])
def test_chunks_keep_padding_within_half_the_pairs(experts):
    """Each expert's last chunk is padded: at most experts * (chunk - 1) extra rows, <= pairs / 2."""
    for pairs in range(1, 20000, 7):
        chunk = chunk_rows(pairs, experts)
        assert chunk >= 1 and chunk & (chunk - 1) == 0
        assert experts * (chunk - 1) <= pairs / 2
        if pairs >= 1024 * experts:  # big batches use big chunks
            assert chunk >= 256


# Model level: the tiny checkpoints with every router zeroed, so all logits tie and every token
# goes to expert 0 (Llama 4, top-1) or experts 0 and 1 (Gemma 4, top-2); the other experts idle.
# The routed model must give the logits of the same model with dense experts, in one prefill of
# 1 and of 1024 tokens.

@dataclasses.dataclass
class Arch:
    cls: type
    overrides: dict
    routers: str  # parameter name of each MoE layer's router


ARCHS = {
    "llama4": Arch(JaxLlama4ForCausalLM, {}, "feed_forward.router"),
    "gemma4": Arch(JaxGemma4ForCausalLM, {"enable_moe_block": True}, "moe.router_proj"),
}
MAX_LEN = 1024 + PAGE_SIZE


def skewed_model(arch: Arch, path, mesh, moe: MoESetup):
    model, mesh = load_model(arch.cls, path, mesh=mesh, max_model_len=MAX_LEN, moe=moe)
    zeroed = 0
    for layer in model.layers:
        owner, name = layer, arch.routers.split(".")
        for part in name[:-1]:
            owner = getattr(owner, part, None)
        router = getattr(owner, name[-1], None) if owner is not None else None
        if router is not None:
            router.set_value(jnp.zeros_like(router.get_value()))
            zeroed += 1
    assert zeroed
    return model


def prefill_logits(model, path, mesh, ids) -> np.ndarray:
    """Logits of one prefill of `ids`, caches laid out as tpu-inference's runner allocates them."""
    tp, c, kv_share = mesh.devices.size, model.config, None
    if isinstance(model, JaxGemma4ForCausalLM):
        specs, kv_share = runner_cache_layout(path, tp)
    else:
        specs = [(max(c.num_kv_heads, tp), c.head_dim)] * c.num_layers
    engine = Engine(model, mesh, num_pages=MAX_LEN // PAGE_SIZE + 8, max_reqs=1,
                    pages_per_req=MAX_LEN // PAGE_SIZE, cache_specs=specs, kv_share=kv_share)
    request = engine.add(list(ids))
    (logits,) = engine.step([(request, len(ids))])
    return logits


@pytest.mark.parametrize("name, layout", arch_layouts([(1, False), (2, True), (4, False)],
                                                      fast={("llama4", (4, False)), ("gemma4", (2, True))}))
def test_model_with_skewed_routing_matches_dense_experts(name, layout):
    devices, expert_parallel = layout
    arch = ARCHS[name]
    path = cached_checkpoint(name, "tiny", **arch.overrides)
    mesh = auto_mesh(devices)
    routed = skewed_model(arch, path, mesh, MoESetup(mesh, expert_parallel, ExpertsImpl.ROUTED))
    dense = skewed_model(arch, path, mesh, MoESetup(mesh, expert_parallel, ExpertsImpl.DENSE))
    for tokens in (1, 1024):
        ids = np.random.default_rng(tokens).integers(3, 1000, size=tokens).tolist()
        want = prefill_logits(dense, path, mesh, ids)
        got = prefill_logits(routed, path, mesh, ids)
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


# On TPU the experts run tpu-inference's `fused_moe_func` (gmm_tp / gmm_ep) on weights in its
# layout. Its Pallas kernels (tokamax's gmm_v2, the SparseCore gathers) need a TPU, so these
# tests swap exactly those four for plain-JAX stand-ins with the kernels' documented semantics,
# and run everything else: our checkpoint-to-kernel layout, tpu-inference's routing, sorting,
# sharding and combine, Llama 4's input scaling folded into the token, Gemma 4's
# `per_expert_scale` folded into the down projection. The model must match Hugging Face.

STAND_IN_ACTIVATIONS = {"silu": jax.nn.silu, "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True)}


def gmm_stand_in(lhs, rhs, rhs_scale, rhs_bias, group_sizes, group_offset, fuse_act=None,
                 preferred_element_type=None):
    """Rows of group `group_offset + g` times rhs[g] (gmm_v2 with its local groups); with `fuse_act`,
    act(first half of the columns) * second half. Rows of other groups: 0."""
    assert rhs_scale is None and rhs_bias is None
    ends = jnp.cumsum(group_sizes)
    row = jnp.arange(lhs.shape[0])
    out = jnp.zeros((lhs.shape[0], rhs.shape[2]), jnp.float32)
    for g in range(rhs.shape[0]):
        group = group_offset[0] + g
        mine = (row >= ends[group] - group_sizes[group]) & (row < ends[group])
        out = out + jnp.where(mine[:, None], lhs.astype(jnp.float32) @ rhs[g].astype(jnp.float32), 0)
    if fuse_act is not None:
        gate, up = jnp.split(out, 2, axis=1)
        out = STAND_IN_ACTIVATIONS[fuse_act](gate) * up
    return out.astype(preferred_element_type or lhs.dtype)


def gather_reduce_stand_in(x, indices, topk_weights, reduce_group_size):
    """out[t] = sum_j weights[t, j] * x[indices[t * k + j]] (dense_gather_reduce)."""
    rows = x[indices].astype(jnp.float32).reshape(-1, reduce_group_size, x.shape[-1])
    return (rows * topk_weights.reshape(rows.shape[:2])[..., None].astype(jnp.float32)).sum(1).astype(x.dtype)


def ragged_gather_reduce_stand_in(x, indices, topk_weights, valid_rows_mask, reduce_group_size):
    """As dense_gather_reduce, rows outside this shard's experts (`valid_rows_mask` false) counting 0."""
    rows = jnp.where(valid_rows_mask[:, None], x[indices].astype(jnp.float32) * topk_weights[:, None], 0)
    return rows.reshape(-1, reduce_group_size, x.shape[-1]).sum(1).astype(x.dtype)


@pytest.fixture
def stand_in_kernels(monkeypatch):
    from tpu_inference.layers.common import fused_moe_gmm

    monkeypatch.setattr(fused_moe_gmm, "gmm_wrapper", gmm_stand_in)
    monkeypatch.setattr(fused_moe_gmm, "dense_gather_reduce", gather_reduce_stand_in)
    monkeypatch.setattr(fused_moe_gmm, "ragged_gather_reduce", ragged_gather_reduce_stand_in)
    monkeypatch.setattr(fused_moe_gmm, "ragged_gather", lambda x, indices, start, end, **_: x[indices])


@pytest.mark.parametrize("name, layout", arch_layouts([(2, False), (4, False), (4, True)],
                                                      fast={("llama4", (2, False)), ("llama4", (4, False)),
                                                            ("llama4", (4, True)), ("gemma4", (4, True))}))
def test_tpu_kernel_path_with_stand_in_kernels_matches_hf(name, layout, stand_in_kernels):
    from harness import hf_logits
    from jaxllm.model.mlp import GmmExperts

    devices, expert_parallel = layout
    arch = ARCHS[name]
    path = cached_checkpoint(name, "tiny", **arch.overrides)
    mesh = auto_mesh(devices)
    model, _ = load_model(arch.cls, path, mesh=mesh, max_model_len=MAX_LEN,
                          moe=MoESetup(mesh, expert_parallel, ExpertsImpl.TPU_GMM))
    assert any(isinstance(m, GmmExperts) for _, m in nnx.iter_modules(model))
    ids = [2] + np.random.default_rng(0).integers(3, 1000, size=39).tolist()
    np.testing.assert_allclose(prefill_logits(model, path, mesh, ids), hf_logits(path, ids), atol=1e-4, rtol=0)


@pytest.mark.parametrize("backend, shards", [("GMM_TP", 1), ("GMM_TP", 4), ("GMM_EP", 1)])
def test_kernel_layout_is_tpu_inference_layout(backend, shards):
    """`gmm_w13` (numpy, as the checkpoint loads) gives what tpu-inference's `process_moe_weights` gives."""
    from tpu_inference.layers.common.moe import MoEBackend
    from tpu_inference.layers.common.process_weights.moe_weights import FusedMoEWeights, process_moe_weights

    from jaxllm.model.mlp import gmm_w13

    rng = np.random.default_rng(0)
    gate, up = rng.standard_normal((2, 3, 16, 200)).astype(np.float32)  # F = 200: padded per shard
    down = rng.standard_normal((3, 200, 16)).astype(np.float32)
    theirs = process_moe_weights(
        FusedMoEWeights(np.concatenate([gate, up], axis=2).transpose(0, 2, 1), None, None,
                        down.transpose(0, 2, 1), None, None),
        getattr(MoEBackend, backend), w13_reorder_size=shards)
    np.testing.assert_array_equal(gmm_w13(gate, up, shards), np.asarray(theirs.w13_weight))
    np.testing.assert_array_equal(down, np.asarray(theirs.w2_weight))


@pytest.mark.parametrize("tp, flag, expert_parallel", [(1, False, False), (4, False, False), (1, True, False),
                                                       (4, True, True)])
def test_vllm_flags_pick_the_layout(tp, flag, expert_parallel):
    """--enable-expert-parallel splits whole experts once there is more than one device (tpu-inference's rule)."""
    from types import SimpleNamespace

    from vllm.config import ParallelConfig

    config = SimpleNamespace(parallel_config=ParallelConfig(tensor_parallel_size=tp, enable_expert_parallel=flag))
    moe = MoESetup.for_serving(config, auto_mesh(tp))
    assert (moe.expert_parallel, moe.impl) == (expert_parallel, ExpertsImpl.ROUTED)
