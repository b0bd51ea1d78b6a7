"""The plugin's registration and host adaptation, checked in-process (no engine)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import vllm_plugin
from jaxllm.attention import ragged_paged_attention
from jaxllm.vllm_plugin import host


@pytest.fixture(scope="module", autouse=True)
def registered():
    vllm_plugin.register()


def _adapted_names():
    import tpu_inference.layers.common.attention_interface as attention_interface
    import tpu_inference.models.common.compiler_options as compiler_options
    import tpu_inference.utils as utils

    return {
        "step options": compiler_options.get_step_fn_compiler_options,
        "sampling options": compiler_options.get_sampling_compiler_options,
        "memory": utils.hbm_usage_bytes,
        "mesh": utils.make_optimized_mesh,
        "rpa": attention_interface.ragged_paged_attention,
        "rpa hd64": attention_interface.ragged_paged_attention_hd64,
    }


def test_register_adapts_tpu_inference_to_the_cpu_host():
    names = _adapted_names()
    assert names["step options"]() == {} and names["sampling options"]() == {}
    assert names["memory"] is host.host_memory_usage
    assert names["mesh"] is host.plain_mesh
    assert names["rpa"] is ragged_paged_attention and names["rpa hd64"] is ragged_paged_attention


def test_register_twice_is_harmless():
    import logging

    from jaxllm.vllm_plugin import patching

    before, patches = _adapted_names(), patching.installed()
    handlers = logging.getLogger("vllm").handlers
    filters_before = [len(h.filters) for h in handlers]
    vllm_plugin.register()
    vllm_plugin.register()
    assert _adapted_names() == before and patching.installed() == patches
    assert [len(h.filters) for h in handlers] == filters_before


def test_runner_modules_imported_after_register_see_the_adaptations():
    from tpu_inference.runner import decode_loop, tpu_runner

    assert tpu_runner.make_optimized_mesh is host.plain_mesh
    assert decode_loop.get_step_fn_compiler_options() == {}


def test_sampler_imported_before_register_runs_on_this_host():
    """tpu-inference's sampler bakes TPU compile options into its jit when imported: a process that
    imported the runner before the plugin registered (pytest collecting a module that does) must
    still sample here. In a fresh interpreter, so that the import really comes first."""
    import subprocess
    import sys

    script = """
import jax, jax.numpy as jnp
from tpu_inference.runner import tpu_runner  # imports the sampler, options baked in
from tpu_inference.layers.jax.sample.sampling_metadata import TPUSupportedSamplingMetadata
from jaxllm import vllm_plugin
vllm_plugin.register()
mesh = jax.make_mesh((1, 1), ("data", "model"))
logits = jnp.array([[0.0, 3.0, 1.0], [2.0, 0.0, 1.0]])
tokens, _ = tpu_runner.sample(jax.random.key(0), mesh, logits, TPUSupportedSamplingMetadata())
print(tokens.tolist())
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "[1, 0]"


def test_explain_lists_every_patch_applied():
    """What `python -m jaxllm.vllm_plugin --explain` prints: every replaced name, applied, with why."""
    import importlib

    from jaxllm.vllm_plugin import patching

    for patch in patching.installed():
        importlib.import_module(patch.module)
    text = patching.explain()
    names = {p.target for p in patching.installed()}
    assert {"tpu_inference.utils.hbm_usage_bytes", "tpu_inference.utils.device_array",
            "tpu_inference.runner.tpu_runner.TPUModelRunner._modify_prev_results",
            "tpu_inference.runner.kv_cache_manager.KVCacheManager.get_kv_cache_spec",
            "tpu_inference.models.common.model_loader._get_model_architecture"} <= names
    for patch in patching.installed():
        assert f"applied  {patch.target}" in text and patch.why in text
    assert "waiting" not in text and "LOST" not in text


def test_readme_lists_every_patch():
    """The README's table of what jaxllm changes in tpu-inference matches the patches installed."""
    from pathlib import Path

    from jaxllm.vllm_plugin import patching

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    missing = [p.target for p in patching.installed() if f"`{p.target}`" not in readme]
    assert missing == []


def test_a_patch_waits_for_its_module_and_reaches_earlier_copies(tmp_path, monkeypatch):
    """A patch of a module not yet imported applies on import; one of an imported module also
    rebinds `from module import name` copies made before it; installing twice is a no-op."""
    import importlib
    import sys

    from jaxllm.vllm_plugin import patching

    (tmp_path / "jaxllm_fake_lib.py").write_text("def answer():\n    return 1\n")
    (tmp_path / "jaxllm_fake_user.py").write_text("from jaxllm_fake_lib import answer\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    later = patching.Patch("jaxllm_fake_later", "answer", "test", lambda original: lambda: original() + 1)
    (tmp_path / "jaxllm_fake_later.py").write_text("def answer():\n    return 10\n")
    patching.install(later)
    assert not patching.is_applied(later) and "waiting" in patching.explain()
    assert importlib.import_module("jaxllm_fake_later").answer() == 11 and patching.is_applied(later)

    user = importlib.import_module("jaxllm_fake_user")
    now = patching.Patch("jaxllm_fake_lib", "answer", "test", lambda original: lambda: original() + 1)
    patching.install(now)
    patching.install(now)
    assert sys.modules["jaxllm_fake_lib"].answer() == 2 and user.answer() == 2
    assert patching.original("jaxllm_fake_lib.answer")() == 1


def test_tpu_detection_follows_jax_platforms(monkeypatch):
    from jaxllm import platform

    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    assert not platform.on_tpu()
    monkeypatch.setenv("JAX_PLATFORMS", "tpu,cpu")
    assert platform.on_tpu()


def test_plain_mesh_keeps_device_order():
    devices = jax.devices()
    mesh = host.plain_mesh((1, len(devices)), ("data", "model"), devices=devices[::-1])
    assert mesh.axis_names == ("data", "model")
    assert list(mesh.devices.flat) == devices[::-1]


def test_host_memory_counts_live_arrays_and_honours_the_setting(monkeypatch):
    devices = jax.devices()[:1]
    used_before, limit = host.host_memory_usage(devices)[0]
    block = jax.device_put(jnp.ones((16, 2**20), jnp.float32), devices[0])  # 64 MiB
    used_after, _ = host.host_memory_usage(devices)[0]
    assert used_after - used_before >= block.nbytes
    import psutil

    assert 0 < limit <= psutil.virtual_memory().total // len(jax.local_devices())
    monkeypatch.setenv(host.HOST_MEMORY_ENV, "1")
    _, limit_1g = host.host_memory_usage(devices)[0]
    assert limit_1g == 2**30 // len(jax.local_devices())
    del block


def test_kv_budget_scales_with_gpu_memory_utilization(monkeypatch):
    """The runner's budget is limit * gpu_memory_utilization - used, summed over its devices."""
    monkeypatch.setenv(host.HOST_MEMORY_ENV, "8")
    usage = host.host_memory_usage(jax.devices())
    budget = lambda utilization: sum(limit * utilization - used for used, limit in usage)
    assert np.isclose(sum(limit for _, limit in usage), 8 * 2**30, rtol=1e-6)
    assert budget(0.5) > 0 and np.isclose(budget(0.5) - budget(0.25), 0.25 * 8 * 2**30, rtol=1e-6)


@pytest.mark.parametrize("family", ["Llama4", "Gemma4"])
def test_plain_architectures_resolve_to_ours_unless_opted_out(monkeypatch, family):
    from types import SimpleNamespace

    from tpu_inference.models.common import model_loader

    from jaxllm.vllm_plugin.models import USE_BUILTIN_ENV, our_models

    ours = our_models()
    lookup = model_loader._get_model_architecture
    for kind in ("ForCausalLM", "ForConditionalGeneration"):
        for arch in (family + kind, "Jax" + family + kind):  # plain checkpoint name, our explicit name
            assert lookup(SimpleNamespace(architectures=[arch])) is ours["Jax" + family + kind]
    monkeypatch.setenv(USE_BUILTIN_ENV, "1")
    builtin = lookup(SimpleNamespace(architectures=[family + "ForCausalLM"]))
    assert builtin.__module__.startswith("tpu_inference.models.jax")
    assert lookup(SimpleNamespace(architectures=["Jax" + family + "ForCausalLM"])) is ours["Jax" + family + "ForCausalLM"]


def test_gemma4_multimodal_limits_refuse_audio_and_video_and_keep_images():
    """Unserved modalities get limit 0 (vLLM refuses them per request); the image limit is spelled out,
    since tpu-inference's runner turns multimodality off when every limit given is 0."""
    from vllm.config import ModelConfig, VllmConfig

    from jaxllm.checkpoints import cached_checkpoint
    from jaxllm.vllm_plugin.multimodal import refuse_unserved_modalities

    path = str(cached_checkpoint("gemma4", "tiny", multimodal=True))
    config = VllmConfig(model_config=ModelConfig(model=path, max_model_len=256))  # the platform hook runs here
    mm = config.model_config.multimodal_config
    assert {m: mm.get_limit_per_prompt(m) for m in ("image", "audio", "video")} == {"image": 999, "audio": 0,
                                                                                     "video": 0}
    assert mm.limit_per_prompt["image"].count > 0
    refuse_unserved_modalities(config)  # idempotent
    assert mm.get_limit_per_prompt("video") == 0 and mm.get_limit_per_prompt("image") == 999
    with pytest.raises(ValueError, match="audio=1: JaxGemma4ForConditionalGeneration serves image input, not audio"):
        VllmConfig(model_config=ModelConfig(model=path, max_model_len=256, limit_mm_per_prompt={"audio": 1}))


def test_a_patch_leaves_the_replaced_function_where_it_is_defined():
    """The portable kernel replaces tpu-inference's Pallas kernel where the attention looks it up,
    not in the kernel's own module (which interpret-mode tests and anything else still import)."""
    import tpu_inference.layers.common.attention_interface as attention_interface
    from tpu_inference.kernels.ragged_paged_attention.v3 import kernel

    assert attention_interface.ragged_paged_attention is ragged_paged_attention
    assert kernel.ragged_paged_attention is not ragged_paged_attention


def _runner_inputs(max_num_seqs: int = 8, max_num_batched_tokens: int = 256, dtype=jnp.float32):
    """tpu-inference's `TPUModelRunner._init_inputs` run on a stand-in runner: the buckets it builds, no engine."""
    import types

    from tpu_inference.runner.tpu_runner import TPUModelRunner

    runner = types.SimpleNamespace(
        dp_size=1, dtype=dtype, speculative_config=None,
        model_config=types.SimpleNamespace(get_sliding_window=lambda: None, max_model_len=256,
                                           get_vocab_size=lambda: 512),
        cache_config=types.SimpleNamespace(block_size=16, cache_dtype="auto"),
        scheduler_config=types.SimpleNamespace(max_num_seqs=max_num_seqs,
                                               max_num_batched_tokens=max_num_batched_tokens),
        vllm_config=types.SimpleNamespace(sharding_config=types.SimpleNamespace(prefill_cp_size=1),
                                          additional_config={}, speculative_config=None,
                                          parallel_config=types.SimpleNamespace(tensor_parallel_size=1)))
    TPUModelRunner._init_inputs(runner)
    return runner


def test_runner_buckets_start_small_off_tpu(monkeypatch):
    """Off TPU a decode of one request of an fp32 model is padded to 1 token and 2 logits rows, not 16
    and 8; of a bf16 model, to 2 tokens (a one-row product converts bf16 weights to fp32 on the CPU);
    the buckets above stay powers of two. A MIN_TOKEN_BUCKET the user sets is kept."""
    import os

    from tpu_inference.runner import utils as runner_utils

    monkeypatch.delenv("MIN_TOKEN_BUCKET", raising=False)
    runner = _runner_inputs()
    assert runner.num_tokens_paddings == [1, 2, 4, 8, 16, 32, 64, 128, 256]
    assert runner.num_reqs_paddings == [2, 4, 8]
    assert [runner_utils.get_padded_num_reqs_with_upper_limit(n, 8) for n in (1, 2, 3, 5, 8)] == [2, 2, 4, 8, 8]
    assert "MIN_TOKEN_BUCKET" not in os.environ  # set only while the runner reads it
    assert _runner_inputs(dtype=jnp.bfloat16).num_tokens_paddings[0] == 2

    monkeypatch.setenv("MIN_TOKEN_BUCKET", "32")
    assert _runner_inputs().num_tokens_paddings[0] == 32
