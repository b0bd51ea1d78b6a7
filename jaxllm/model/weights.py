"""Stream a Hugging Face checkpoint into a model's parameters, sharded as they load.

The tensors come from vLLM's own model loader (`checkpoint_tensors`), so
`--load-format`, `--download-dir`, `--revision`, sharded checkpoints with their
index and hub downloads (with vLLM's progress bar) behave as for any vLLM model;
with `--load-format runai_streamer` they come from the iterator tpu-inference
hands the model.

A model describes its checkpoint with `Rule`s: a regular expression over tensor
names, the parameter(s) it fills (`{0}`, `{1}` … are the expression's groups),
and a transform from the torch layout to ours. Each tensor is read, transformed,
checked against its parameter's shape and put on the mesh with the parameter's
sharding before the next one is read, so host memory holds one tensor at a time.

Anything that doesn't fit is an error naming the tensor (and, for a local
checkpoint, its file): a tensor no rule claims (unless it belongs to a part we
skip, such as a vision tower), a shape mismatch, or a parameter no tensor filled.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
from typing import Callable, Iterable, Iterator

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
    row: str | None = None               # the tensor is this row (axis 0) of its targets, e.g. "{1}" for
                                         # one expert's weights in a stacked [E, ...] parameter


def parameters(model: nnx.Module) -> dict[str, nnx.Param]:
    """Every `nnx.Param` of the model by its dotted path, e.g. `layers.0.attn.q_proj`."""
    return {".".join(str(p) for p in path): node
            for path, node in nnx.iter_graph(model) if isinstance(node, nnx.Param)}


def checkpoint_tensors(vllm_config, model=None) -> Iterator[tuple[str, np.ndarray]]:
    """(name, array) of every tensor of the checkpoint `vllm_config` names, as vLLM's loader reads them."""
    from vllm.model_executor.model_loader import get_model_loader
    from vllm.model_executor.model_loader.default_loader import DefaultModelLoader

    model_config = vllm_config.model_config
    tensors = getattr(model_config, "runai_model_weights_iterator", None)  # set by tpu-inference's loader
    if tensors is None:
        loader = get_model_loader(vllm_config.load_config)
        if not isinstance(loader, DefaultModelLoader):
            raise CheckpointError(f"--load-format {vllm_config.load_config.load_format!r} is not supported by "
                                  "jaxllm's models (supported: auto, safetensors, pt, dummy, runai_streamer)")
        tensors = loader.get_all_weights(model_config, model)
    for name, tensor in tensors:
        yield name, to_numpy(tensor)


def to_numpy(tensor) -> np.ndarray:
    """A torch tensor as numpy without a copy; bf16 and fp8 become their ml_dtypes types."""
    import ml_dtypes
    import torch

    views = {torch.bfloat16: (torch.int16, ml_dtypes.bfloat16),
             torch.float8_e4m3fn: (torch.uint8, ml_dtypes.float8_e4m3fn),
             torch.float8_e5m2: (torch.uint8, ml_dtypes.float8_e5m2)}
    if not isinstance(tensor, torch.Tensor):
        return np.asarray(tensor)
    tensor = tensor.detach().cpu()
    if tensor.dtype in views:
        as_int, as_numpy = views[tensor.dtype]
        return tensor.view(as_int).numpy().view(as_numpy)
    return tensor.numpy()


def tensor_files(model_dir: str) -> dict[str, str]:
    """Tensor name -> file, for naming files in errors; {} unless `model_dir` is a local checkpoint folder."""
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            return {name: os.path.join(model_dir, file) for name, file in json.load(f)["weight_map"].items()}
    single = os.path.join(model_dir, "model.safetensors")
    if os.path.exists(single):
        from safetensors import safe_open

        with safe_open(single, framework="np") as f:
            return dict.fromkeys(f.keys(), single)
    return {}


def load_checkpoint(model: nnx.Module, tensors: Iterable[tuple[str, np.ndarray]], rules: list[Rule], *,
                    mesh: Mesh, dtype, checkpoint: str, strip_prefixes: tuple[str, ...] = (),
                    skip_prefixes: tuple[str, ...] = ()) -> None:
    """Fill every parameter of `model` from `tensors`, the checkpoint `checkpoint` (a folder or a hub id)."""
    params = parameters(model)
    compiled = [(re.compile(rule.pattern), rule) for rule in rules]
    files = tensor_files(checkpoint) if os.path.isdir(checkpoint) else {}
    filled: dict[str, str] = {}
    rows_filled: dict[str, set[int]] = {}  # stacked parameters filled row by row
    stripped = ""  # the prefix this checkpoint's names carry, for error messages
    for name, array in tensors:
        where = f"tensor {name!r} in {files.get(name, checkpoint)}"
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
        row = None if rule.row is None else int(rule.row.format(*m.groups()))
        for target, value in zip(targets, values, strict=True):
            if target not in params and f"{target}.array.qvalue" in params:
                target = f"{target}.array.qvalue"  # a weight the model holds quantized (Qwix's form): its values
            param = params.get(target)
            if param is None:
                raise CheckpointError(f"unexpected {where}: the model has no parameter {target!r}")
            expected = tuple(param.shape) if row is None else tuple(param.shape[1:])
            if tuple(value.shape) != expected or (row is not None and not 0 <= row < param.shape[0]):
                raise CheckpointError(f"shape mismatch for {where}: parameter {target!r} expects "
                                      f"{expected}" + ("" if row is None else f" for each of rows 0..{param.shape[0] - 1}")
                                      + f", the checkpoint gives {tuple(value.shape)}"
                                      + ("" if row is None else f" for row {row}")
                                      + (" after conversion" if value is not array else ""))
            sharding = NamedSharding(mesh, P(*(param.get_metadata("out_sharding", None) or ())))
            # Each parameter keeps the dtype it was created in: the model's `dtype`, or a quantized
            # weight's own (fp8 values, fp32 scales).
            param_dtype = param.get_value().dtype
            value = np.asarray(value).astype(param_dtype)
            if row is None:
                param.set_value(jax.device_put(value, sharding))
                filled[target] = where
                continue
            # One row of a stacked parameter: written in place, so host memory still holds one tensor.
            done = rows_filled.setdefault(target, set())
            if not done:
                param.set_value(_zeros(param.shape, param_dtype, sharding))
            param.set_value(_set_row(param.value, row, value))
            done.add(row)
            if len(done) == param.shape[0]:
                filled[target] = where
    missing = sorted(set(params) - set(filled))
    if missing:
        named = [f"{target} (tensor {_tensor_name(target, rules, stripped)!r})"
                 + (f" rows {sorted(set(range(params[target].shape[0])) - rows_filled[target])}"
                    if target in rows_filled else "")
                 for target in missing[:20]]
        raise CheckpointError(f"checkpoint {checkpoint} has no tensor for {len(missing)} parameter(s): "
                              + ", ".join(named) + (" ..." if len(missing) > 20 else ""))


def _zeros(shape, dtype, sharding):
    return jax.jit(lambda: jax.numpy.zeros(shape, dtype), out_shardings=sharding)()


@functools.partial(jax.jit, donate_argnums=0)
def _set_row(stacked: jax.Array, row, value) -> jax.Array:
    return stacked.at[row].set(value)


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
