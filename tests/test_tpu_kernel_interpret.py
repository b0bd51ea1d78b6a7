"""dispatch's TPU branch through tpu-inference's real RPA v3 kernels, interpreted on the CPU.

`tests/tpu_interpret.py` runs the Pallas TPU kernels in Pallas's TPU interpret mode
(simulated HBM, VMEM, DMAs and semaphores). Here `dispatch.attention` takes its TPU
branch, tpu-inference's `sharded_ragged_paged_attention` with the kernel it ships
(not the portable one the plugin swaps in off TPU), and the results are compared
with jaxllm's portable attention on the same inputs:
(a) causal, sliding window, and the head_dim 64 kernel;
(b) Llama 4's chunked layers as `virtual_batches` (narrow page tables);
(c) `update_kv_cache=False` (KV-shared layers): the cache comes back unchanged;
(d) two row layouts: on TPU each gets a buffer of its own, which matches the
    portable path's one buffer viewed in both layouts, and the kernel refuses a
    buffer in the other layout.

Interpreting is slow (seconds per call): the chunked case runs by default, the
others with `JAXLLM_TPU_INTERPRET=all`.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType
from tpu_inference.kernels.ragged_paged_attention.v3 import kernel as tpu_rpa
from tpu_inference.kernels.ragged_paged_attention.v3 import kernel_hd64 as tpu_rpa_hd64
from tpu_inference.layers.common import attention_interface
from tpu_inference.layers.common.attention_metadata import AttentionMetadata

from jaxllm import platform
from jaxllm.attention import dispatch
from jaxllm.attention.chunked import virtual_batches
from jaxllm.attention.portable import ragged_paged_attention
from jaxllm.vllm_plugin import patching
from test_attention import BF16, F32, F32_TOL, assert_bitwise_equal, assert_cache_updated_exactly, \
    expected_cache, make_case
from tpu_interpret import tpu_kernels_interpreted

slow = pytest.mark.skipif(os.environ.get("JAXLLM_TPU_INTERPRET") != "all",
                          reason="slow (the TPU kernel interpreted); JAXLLM_TPU_INTERPRET=all runs it")

# The kernel keeps its softmax state and accumulator in the output dtype (kernel.py:
# out_dtype = bf16 for bf16 queries) and rescales them at every KV block; the portable
# attention keeps them in fp32 and rounds once. The accumulator has the magnitude of V
# (|v| < 4 here, a bf16 ulp 2**-6 there), so errors are absolute, a few ulps: measured up
# to 0.031 (2 ulps). A wrong page, head or packing is an O(1) error; a mask off by one
# key moves an output by ~|v| / (keys attended), which the fp32 cases (1e-5) catch.
KERNEL_BF16_TOL = dict(rtol=2e-2, atol=5e-2)
# Batches cross pages (16 tokens) and chunks (32), with decode rows at chunk edges.
SPECS = ([33, 64, 65, 100], [40], [(50, 100), (10, 70)])
SHAPES = dict(num_tokens=128, max_num_seqs=8, pages_per_seq=8, num_pages=64)
CHUNK = 32


def runner_case(seed, heads, dtype, **kw):
    case = make_case(seed, *SPECS, heads=heads, dtype=dtype, **{**SHAPES, **kw})
    # The runner sends (decodes, decodes, all) (tpu_runner.py, request_distribution): the kernel
    # runs the middle range, "prefill-only", only when given a static chunk_prefill_size.
    case.distribution[1] = case.distribution[0]
    return case


@pytest.fixture
def tpu_branch(monkeypatch):
    """dispatch.attention's TPU branch with tpu-inference's own kernels, interpreted."""
    take_tpu_branch(monkeypatch, True)
    # plugin.register() (run by other test modules) puts the portable kernel in their place, in
    # attention_interface and in every module holding the same function, the kernel's own included.
    for module, name in ((tpu_rpa, "ragged_paged_attention"), (tpu_rpa_hd64, "ragged_paged_attention_hd64")):
        try:
            kernel = patching.original(f"{attention_interface.__name__}.{name}")
        except KeyError:  # not patched in this process
            kernel = getattr(module, name)
        monkeypatch.setattr(attention_interface, name, kernel)
    # JAX keeps traced programs of earlier tests (test_attention.py's, with the portable kernel
    # swapped in); those would be reused here and no Pallas kernel would run.
    jax.clear_caches()

    def run(case, cache=None, *, mesh_shape=(1, 1), **opts):
        layer = jax.jit(functools.partial(dispatch.attention, mesh=_mesh(mesh_shape),
                                          sm_scale=case.head_dim ** -0.5, **opts))
        args = (*_qkv(case), jnp.asarray(case.cache if cache is None else cache), _metadata(case))
        with tpu_kernels_interpreted():
            assert "pallas_call" in str(jax.make_jaxpr(layer)(*args)), "not the Pallas kernel"
            return _out_and_cache(layer(*args))

    return run


def take_tpu_branch(monkeypatch, value: bool):
    """Make dispatch take its TPU branch, or not."""
    monkeypatch.setattr(platform, "on_tpu", lambda: value)


def _mesh(shape):
    return jax.make_mesh(shape, ("data", "model"), axis_types=(AxisType.Auto, AxisType.Auto),
                         devices=jax.devices()[:np.prod(shape)])


def _qkv(case):
    return jnp.asarray(case.q), jnp.asarray(case.k), jnp.asarray(case.v)


def _metadata(case):
    kv_lens, page_indices, cu_q_lens, distribution = case.metadata()
    return AttentionMetadata(input_positions=jnp.zeros(case.q.shape[0], jnp.int32), block_tables=page_indices,
                             seq_lens=kv_lens, query_start_loc=cu_q_lens, request_distribution=distribution)


def _out_and_cache(result):
    out, cache = result
    return np.asarray(out), np.asarray(cache)


@functools.partial(jax.jit, static_argnames=("sm_scale", "sliding_window", "chunk_size", "update_kv_cache"))
def portable(q, k, v, cache, kv_lens, page_indices, cu_q_lens, distribution, **opts):
    return ragged_paged_attention(q, k, v, cache, kv_lens, page_indices, cu_q_lens, distribution, **opts)


def assert_matches_portable(case, out, cache_in=None, **opts):
    """Outputs of the real tokens as the portable attention's (with the chunk mask where chunked)."""
    args = (*_qkv(case), jnp.asarray(case.cache if cache_in is None else cache_in), *case.metadata())
    expected, expected_cache_ = portable(*args, sm_scale=case.head_dim ** -0.5, **opts)
    n = case.num_real_tokens
    tol = F32_TOL if case.q.dtype == F32 else KERNEL_BF16_TOL
    np.testing.assert_allclose(out[:n].astype(np.float32), np.asarray(expected)[:n].astype(np.float32), **tol)
    return np.asarray(expected_cache_)


# ---------------------------------------------------------------------------
# (b) chunked layers, the default case.


def test_chunked_layers_run_as_virtual_batches_on_the_real_kernel(tpu_branch):
    """Llama 4's chunked layers on TPU: virtual requests, each with a chunk-wide page table, causal in
    the kernel == the chunk mask in the portable attention; KV heads sharded over two devices."""
    case = runner_case(3, (4, 2, 128), F32)
    out, cache = tpu_branch(case, mesh_shape=(1, 2), chunk_size=CHUNK)
    assert_matches_portable(case, out, chunk_size=CHUNK)
    assert_cache_updated_exactly(case, cache)
    # The kernel's own runtime checks of the virtual requests: 0 < q_len <= kv_len, every page
    # they need within their (chunk-wide) row, every page id in the cache.
    virtual = virtual_batches(*case.metadata(), chunk_size=CHUNK, page_size=case.page_size,
                              num_tokens=case.q.shape[0])
    assert virtual[1].shape == (virtual[0].shape[0] * CHUNK // case.page_size,)
    tpu_rpa.dynamic_validate_inputs(*_qkv(case), jnp.asarray(case.cache), *virtual)


@slow
def test_chunked_layers_bf16(tpu_branch):
    case = runner_case(4, (8, 1, 128), BF16)
    out, cache = tpu_branch(case, chunk_size=CHUNK)
    assert_matches_portable(case, out, chunk_size=CHUNK)
    assert_cache_updated_exactly(case, cache)


# ---------------------------------------------------------------------------
# (a) causal and sliding window.


@slow
@pytest.mark.parametrize("heads,dtype,opts", [
    ((4, 2, 128), F32, dict(sliding_window=37)),
    ((8, 1, 128), BF16, {}),
    # tpu-inference's hd64 kernel, with its own cache layout (K and V side by side)
    ((4, 2, 64), F32, dict(sliding_window=37)),
    ((8, 1, 64), BF16, {}),
], ids=["window37-f32", "causal-bf16", "hd64-window37-f32", "hd64-causal-bf16"])
def test_causal_and_sliding_window(tpu_branch, heads, dtype, opts):
    case = runner_case(5, heads, dtype)
    out, cache = tpu_branch(case, **opts)
    assert_matches_portable(case, out, **opts)
    assert_cache_updated_exactly(case, cache)


# ---------------------------------------------------------------------------
# (c) KV-shared layers.


@slow
@pytest.mark.parametrize("opts", [dict(sliding_window=37), dict(chunk_size=CHUNK)], ids=["window37", "chunked"])
def test_kv_shared_layer_leaves_the_cache_unchanged(tpu_branch, opts):
    """update_kv_cache=False: the kernel reads this step's K/V from the cache, where the donor layer
    wrote them earlier in the step, and writes nothing; the portable attention takes them from k/v,
    which a KV-shared layer gets from its donor. Same output, and the cache bitwise unchanged."""
    case = runner_case(6, (4, 2, 128), F32)
    donor_written = expected_cache(case)  # the donor's write of this step's tokens
    out, cache = tpu_branch(case, donor_written, update_kv_cache=False, **opts)
    assert_matches_portable(case, out, donor_written, update_kv_cache=False, **opts)
    assert_bitwise_equal(cache, donor_written)


# ---------------------------------------------------------------------------
# (d) layers of two row layouts.


@slow
def test_each_row_layout_has_its_own_buffer_on_tpu(tpu_branch):
    """Gemma 4's sliding and global layers store different rows (here 2 KV heads of 128 and one of 256,
    the same bytes per token). Off TPU they share one buffer, stored in one layout and viewed in the
    other (`_in_layer_layout`); on TPU the plugin gives each layout its own buffer, since the kernel
    takes only its own (it checks the shape). The TPU branch on its own buffer == the portable branch
    on the shared one, output and cache bytes; given the shared buffer, the kernel refuses it."""
    case = runner_case(7, (4, 1, 256), F32)
    num_pages, page_size, rows, packing, width = case.cache.shape
    shared = case.cache.reshape(num_pages, page_size, 2 * rows, packing, width // 2)  # the 2 x 128 layer's layout
    out, cache = tpu_branch(case)
    portable_layer = jax.jit(functools.partial(dispatch.attention, mesh=_mesh((1, 1)),
                                               sm_scale=case.head_dim ** -0.5))
    with pytest.MonkeyPatch.context() as m:
        take_tpu_branch(m, False)
        shared_out, shared_cache = _out_and_cache(portable_layer(*_qkv(case), jnp.asarray(shared), _metadata(case)))
    n = case.num_real_tokens
    np.testing.assert_allclose(out[:n], shared_out[:n], **F32_TOL)
    assert_bitwise_equal(shared_cache.reshape(case.cache.shape), cache)
    assert_cache_updated_exactly(case, cache)
    with pytest.raises(ValueError, match="kv_cache.shape"):
        tpu_branch(case, shared)


# ---------------------------------------------------------------------------
# (e) fp8 KV caches (`--kv-cache-dtype fp8`).


def fp8_case(seed, heads, dtype):
    """A cache of fp8 history (as quantize_kv stored it) and unquantized fp32 q/k/v, as a layer computes them."""
    case = runner_case(seed, heads, np.dtype(dtype))
    rng = np.random.default_rng([seed, 3])
    case.q, case.k, case.v = (rng.standard_normal(a.shape, np.float32) for a in (case.q, case.k, case.v))
    return case


def portable_branch(case, cache, **opts):
    with pytest.MonkeyPatch.context() as m:
        take_tpu_branch(m, False)
        layer = jax.jit(functools.partial(dispatch.attention, mesh=_mesh((1, 1)), sm_scale=case.head_dim ** -0.5,
                                          **opts))
        return _out_and_cache(layer(*_qkv(case), jnp.asarray(cache), _metadata(case)))


@pytest.mark.parametrize("heads,dtype,opts", [
    ((4, 2, 128), jnp.float8_e4m3fn, dict(sliding_window=37, k_scale=2.0, v_scale=0.5)),
    pytest.param((8, 1, 64), jnp.float8_e4m3fn, dict(k_scale=0.5, v_scale=2.0), marks=slow),
    pytest.param((4, 2, 128), jnp.float8_e5m2, dict(k_scale=1.0, v_scale=1.0), marks=slow),
], ids=["hd128-e4m3-window37", "hd64-e4m3", "hd128-e5m2"])
def test_fp8_cache_on_the_real_kernel_matches_the_portable_branch(tpu_branch, heads, dtype, opts):
    """dispatch quantizes K/V into the fp8 cache (quantize_kv) and passes k_scale/v_scale; the TPU kernel
    and the portable attention dequantize alike: outputs within fp32 rounding (both read fp8 exactly and
    compute in fp32; a scale applied twice or not at all is a 2x error), caches bitwise equal."""
    case = fp8_case(9, heads, dtype)
    out, cache = tpu_branch(case, **opts)
    expected, expected_cache = portable_branch(case, case.cache, **opts)
    assert cache.dtype == np.dtype(dtype)
    n = case.num_real_tokens
    np.testing.assert_allclose(out[:n], expected[:n], **F32_TOL)
    assert_bitwise_equal(cache, expected_cache)
    untouched = np.ones(case.cache.shape[0], bool)
    untouched[[p for s in case.seqs for p in s.pages]] = False
    assert_bitwise_equal(cache[untouched], case.cache[untouched])
