"""Stream Hugging Face safetensors into a model's parameters, sharded as they load.

A model describes its checkpoint with `Rule`s: a regular expression over tensor
names, the parameter(s) it fills (`{0}`, `{1}` … are the expression's groups),
and a transform from the torch layout to ours. Each tensor is read, transformed,
checked against its parameter's shape and put on the mesh with the parameter's
sharding before the next one is read, so host memory holds one tensor at a time.

Anything that doesn't fit is an error naming the tensor and its file: a tensor
no rule claims (unless it belongs to a part we skip, such as a vision tower), a
shape mismatch, or a parameter that no tensor filled.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
from typing import Callable, Iterator

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from vllm.logger import init_logger

logger = init_logger("vllm.jaxllm.weights")


class CheckpointError(ValueError):
    """The checkpoint doesn't match the model: missing, unexpected or mis-shaped tensors."""


@dataclasses.dataclass(frozen=True)
class Rule:
    pattern: str                         # full match against the tensor name, after prefix stripping
    targets: tuple[str, ...]             # parameter paths, formatted with the match groups
    transform: Callable[[np.ndarray], tuple[np.ndarray, ...]] = lambda w: (w,)


def parameters(model: nnx.Module) -> dict[str, nnx.Param]:
    """Every `nnx.Param` of the model by its dotted path, e.g. `layers.0.attn.q_proj`."""
    return {".".join(str(p) for p in path): node
            for path, node in nnx.iter_graph(model) if isinstance(node, nnx.Param)}


def checkpoint_files(model_dir: str) -> list[str]:
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(model_dir, n) for n in names]
    files = sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))
    if not files:
        raise CheckpointError(f"no *.safetensors files in {model_dir}")
    return files


def read_tensors(path: str) -> Iterator[tuple[str, np.ndarray]]:
    """(name, array) pairs of one safetensors file; bf16 comes back as ml_dtypes.bfloat16 without a copy."""
    import ml_dtypes
    import torch
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        for name in f.keys():
            tensor = f.get_tensor(name)
            if tensor.dtype == torch.bfloat16:
                yield name, tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
            else:
                yield name, tensor.numpy()


def resolve_model_dir(model: str, revision: str | None = None) -> str:
    if os.path.isdir(model):
        return model
    from huggingface_hub import snapshot_download

    return snapshot_download(model, revision=revision, allow_patterns=["*.safetensors", "*.json"])


def load_checkpoint(model: nnx.Module, model_dir: str, rules: list[Rule], *, mesh: Mesh, dtype,
                    strip_prefixes: tuple[str, ...] = (), skip_prefixes: tuple[str, ...] = ()) -> None:
    """Fill every parameter of `model` from the checkpoint in `model_dir`."""
    params = parameters(model)
    compiled = [(re.compile(rule.pattern), rule) for rule in rules]
    filled: dict[str, str] = {}
    stripped = ""  # the prefix this checkpoint's names carry, for error messages
    files = checkpoint_files(model_dir)
    for number, path in enumerate(files, 1):
        logger.info("jaxllm: loading weights from %s (%d/%d)", os.path.basename(path), number, len(files))
        for name, array in read_tensors(path):
            where = f"tensor {name!r} in {path}"
            local = name
            for prefix in strip_prefixes:
                if local.startswith(prefix):
                    local, stripped = local[len(prefix):], prefix
                    break
            if local.startswith(skip_prefixes):
                continue
            match = next(((m, rule) for regex, rule in compiled if (m := regex.fullmatch(local))), None)
            if match is None:
                raise CheckpointError(f"unexpected {where}: the model has no parameter for it")
            m, rule = match
            targets = [t.format(*m.groups()) for t in rule.targets]
            values = rule.transform(array)
            for target, value in zip(targets, values, strict=True):
                param = params.get(target)
                if param is None:
                    raise CheckpointError(f"unexpected {where}: the model has no parameter {target!r}")
                if tuple(value.shape) != tuple(param.shape):
                    raise CheckpointError(f"shape mismatch for {where}: parameter {target!r} expects "
                                          f"{tuple(param.shape)}, the checkpoint gives {tuple(value.shape)}"
                                          + (" after conversion" if value is not array else ""))
                spec = P(*(param.get_metadata("out_sharding", None) or ()))
                param.set_value(jax.device_put(np.asarray(value).astype(dtype), NamedSharding(mesh, spec)))
                filled[target] = where
    missing = sorted(set(params) - set(filled))
    if missing:
        named = [f"{target} (tensor {_tensor_name(target, rules, stripped)!r})" for target in missing[:20]]
        raise CheckpointError(f"checkpoint {model_dir} has no tensor for {len(missing)} parameter(s): "
                              + ", ".join(named) + (" ..." if len(missing) > 20 else ""))


def _tensor_name(target: str, rules: list[Rule], prefix: str) -> str:
    """The checkpoint tensor a rule would have filled `target` from, e.g. 'model.layers.1.self_attn.k_proj.weight'."""
    for rule in rules:
        for template in rule.targets:
            groups = re.fullmatch(re.sub(r"\\{(\d+)\\}", r"(?P<g\1>[^.]+)", re.escape(template)), target)
            if groups is None:
                continue
            found = {int(key[1:]): value for key, value in groups.groupdict().items()}
            values = iter(found.get(i, "?") for i in range(max(found, default=-1) + 1))
            # Each capture group of the rule's pattern, in order, becomes its value.
            name = re.sub(r"\((?!\?)[^()]*\)", lambda _: next(values, "?"), rule.pattern)
            return prefix + name.replace("\\", "")
    return "?"


# Layout conversions from torch's (out, in) Linear weights.

def transpose(w: np.ndarray) -> tuple[np.ndarray]:
    return (w.T,)


def heads_in(num_heads: int) -> Callable[[np.ndarray], tuple[np.ndarray]]:
    """[heads * H, D] -> [D, heads, H] (a q/k/v projection)."""
    def convert(w):
        return (w.reshape(num_heads, -1, w.shape[-1]).transpose(2, 0, 1),)
    return convert


def heads_out(num_heads: int) -> Callable[[np.ndarray], tuple[np.ndarray]]:
    """[D, heads * H] -> [heads, H, D] (the output projection)."""
    def convert(w):
        return (w.reshape(w.shape[0], num_heads, -1).transpose(1, 2, 0),)
    return convert


def split_last(parts: int) -> Callable[[np.ndarray], tuple[np.ndarray, ...]]:
    """Split a fused tensor into `parts` equal pieces along its last axis (e.g. gate | up)."""
    def convert(w):
        return tuple(np.split(w, parts, axis=-1))
    return convert
