"""Checkpoints as vLLM hands them over: its loader's flags, hub-cache folders, sharded and per-expert layouts.

Each case loads our model twice, once from the tiny checkpoint as built and once
from the variant under test, and requires every parameter to be equal: the
variant must reach the same weights by another road.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file, save_file

from harness import broken_copy, load_model

from jaxllm.checkpoints import GEMMA4_MOE, cached_checkpoint
from jaxllm.model.gemma4 import JaxGemma4ForCausalLM
from jaxllm.model.llama4 import JaxLlama4ForCausalLM
from jaxllm.model.weights import CheckpointError


def params_of(model) -> dict[str, np.ndarray]:
    return {".".join(map(str, path)): np.asarray(value[...])
            for path, value in nnx.iter_graph(model) if isinstance(value, nnx.Param)}


def assert_same_params(a, b):
    pa, pb = params_of(a), params_of(b)
    assert pa.keys() == pb.keys()
    for name in pa:
        np.testing.assert_array_equal(pa[name], pb[name], err_msg=name)


def per_expert(llama_layout: bool):
    """Split fused `experts.gate_up_proj` / `experts.down_proj` into one torch Linear per expert."""
    def edit(tensors):
        out = {}
        for name, w in tensors.items():
            w = w.numpy()
            if name.endswith("experts.gate_up_proj"):
                base = name[:-len("gate_up_proj")]
                for e, fused in enumerate(w):
                    # Llama 4 stores [D, 2F] (gate | up on the last axis), Gemma 4 [2F, D].
                    gate, up = np.split(fused.T if llama_layout else fused, 2, axis=0)
                    out[f"{base}{e}.gate_proj.weight"], out[f"{base}{e}.up_proj.weight"] = gate, up
            elif name.endswith("experts.down_proj"):
                base = name[:-len("down_proj")]
                for e, down in enumerate(w):
                    # Llama 4 stores [F, D], Gemma 4 [D, F]; a torch Linear is [out, in] = [D, F].
                    out[f"{base}{e}.down_proj.weight"] = down.T if llama_layout else down
            else:
                out[name] = w
        assert any(".experts.0." in name for name in out)
        tensors.clear()
        tensors.update({name: torch.from_numpy(np.ascontiguousarray(w)) for name, w in out.items()})
    return edit


@pytest.mark.parametrize("family", ["llama4", "gemma4"])
def test_per_expert_checkpoints_load_the_same_weights(tmp_path, family):
    if family == "llama4":
        cls, fused, edit = JaxLlama4ForCausalLM, cached_checkpoint("llama4", "tiny"), per_expert(llama_layout=True)
    else:
        cls, fused = JaxGemma4ForCausalLM, cached_checkpoint("gemma4", "tiny", enable_moe_block=True,
                                                               **GEMMA4_MOE["tiny"])
        edit = per_expert(llama_layout=False)
    split = broken_copy(fused, tmp_path, edit, name="per-expert")
    assert_same_params(load_model(cls, fused)[0], load_model(cls, split)[0])

    # A missing expert is named with the rows that never came.
    def drop_expert_1(tensors):
        edit(tensors)
        for name in [n for n in tensors if ".experts.1.up_proj" in n]:
            del tensors[name]
    broken = broken_copy(fused, tmp_path, drop_expert_1, name="missing-expert")
    with pytest.raises(CheckpointError, match=r"experts\.up_proj \(tensor .*\) rows \[1\]"):
        load_model(cls, broken)


def test_sharded_checkpoint_with_index_loads_the_same_weights(tmp_path):
    source = cached_checkpoint("llama4", "tiny")
    sharded = tmp_path / "sharded"
    shutil.copytree(source, sharded, ignore=shutil.ignore_patterns("model.safetensors"))
    tensors = load_file(source / "model.safetensors")
    names = sorted(tensors)
    weight_map = {}
    for shard, part in enumerate(np.array_split(np.arange(len(names)), 3)):
        file = f"model-{shard + 1:05d}-of-00003.safetensors"
        save_file({names[i]: tensors[names[i]] for i in part}, sharded / file, metadata={"format": "pt"})
        weight_map.update({names[i]: file for i in part})
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    assert_same_params(load_model(JaxLlama4ForCausalLM, source)[0], load_model(JaxLlama4ForCausalLM, sharded)[0])
    # Errors still name the file the tensor is in.
    bad = weight_map[names[-1]]
    shard_tensors = load_file(sharded / bad)
    shard_tensors[names[-1]] = shard_tensors[names[-1]][..., :1]
    save_file(shard_tensors, sharded / bad, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=f"shape mismatch for tensor '{names[-1]}' in .*{bad}"):
        load_model(JaxLlama4ForCausalLM, sharded)


def hub_cache(root, repo: str, files, revision: str):
    """`files` placed as huggingface_hub's cache holds repo `repo` at commit `revision`."""
    repo_dir = root / f"models--{repo.replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / revision
    snapshot.mkdir(parents=True)
    for file in files:
        shutil.copy(file, snapshot / file.name)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(revision)
    return root


def test_weights_come_from_download_dir_at_the_revision(tmp_path):
    """A hub id with --download-dir and --revision, offline: vLLM's loader finds the weights where
    the user put them (config and tokenizer in the HF cache, weights only in the download dir),
    and our model loads them. Run in a subprocess so the HF cache settings apply from the start."""
    source = cached_checkpoint("llama4", "tiny")
    revision = "0123456789abcdef0123456789abcdef01234567"
    configs = [f for f in source.iterdir() if f.suffix != ".safetensors"]
    hub_cache(tmp_path / "hf-cache", "jaxllm-test/tiny-llama4", configs, revision)
    hub_cache(tmp_path / "downloads", "jaxllm-test/tiny-llama4", [source / "model.safetensors"], revision)
    script = textwrap.dedent(f"""
        import jax, numpy as np, sys
        sys.path.insert(0, {str(os.path.dirname(__file__))!r})
        from flax import nnx
        from vllm.config import LoadConfig, ModelConfig, VllmConfig
        from harness import auto_mesh, load_model
        from jaxllm.model.llama4 import JaxLlama4ForCausalLM
        config = VllmConfig(model_config=ModelConfig(model="jaxllm-test/tiny-llama4", revision={revision!r},
                                                     dtype="float32", max_model_len=256),
                            load_config=LoadConfig(download_dir={str(tmp_path / "downloads")!r}))
        mesh = auto_mesh()
        with jax.set_mesh(mesh):
            model = nnx.eval_shape(lambda: JaxLlama4ForCausalLM(config, jax.random.key(0), mesh))
            model.load_weights(jax.random.key(0))
        reference, _ = load_model(JaxLlama4ForCausalLM, {str(source)!r})
        for (path, a), (_, b) in zip(nnx.iter_graph(model), nnx.iter_graph(reference)):
            if isinstance(a, nnx.Param):
                np.testing.assert_array_equal(np.asarray(a[...]), np.asarray(b[...]), err_msg=str(path))
        print("loaded from the download dir")
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hf-cache"),
           "HF_HOME": str(tmp_path / "hf-home"), "PYTHONPATH": os.pathsep.join(sys.path)}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and "loaded from the download dir" in result.stdout, result.stderr[-3000:]


def test_unsupported_load_format_is_refused_by_name(tmp_path):
    from vllm.config import LoadConfig, ModelConfig, VllmConfig

    from harness import auto_mesh

    source = cached_checkpoint("llama4", "tiny")
    config = VllmConfig(model_config=ModelConfig(model=str(source), dtype="float32", max_model_len=256),
                        load_config=LoadConfig(load_format="sharded_state"))
    mesh = auto_mesh()
    with jax.set_mesh(mesh):
        model = nnx.eval_shape(lambda: JaxLlama4ForCausalLM(config, jax.random.key(0), mesh))
        with pytest.raises(CheckpointError, match="--load-format 'sharded_state' is not supported"):
            model.load_weights(jax.random.key(0))
