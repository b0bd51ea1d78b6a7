"""tpu-inference's Pallas TPU kernels on the CPU, in Pallas's TPU interpret mode.

`pltpu.force_tpu_interpret_mode` runs a TPU kernel on the CPU with simulated
HBM, VMEM, DMAs and semaphores. For tpu-inference's RPA v3 kernels (`kernel.py`
and `kernel_hd64.py`) it needs two things that jax 0.11.2 on a CPU lacks:

- a TPU to describe: the kernels ask `get_tpu_version()` (from the device kind;
  -1 on a CPU, which the block-size heuristics reject) and `pltpu.get_tpu_info()`
  (raises off TPU) for the VMEM limit. We answer for one chip, v6e by default,
  from jax's own table (`get_tpu_info_for_chip`);
- reshaped and bitcast refs. The kernel addresses the paged cache in HBM through
  `kv_cache_hbm_ref.reshape(pages * page_size, ...)` (one token per row) and its
  VMEM buffers through `.bitcast(jnp.uint32)...reshape(rows, 128)` views. The
  interpreter turns a ref's transforms into one index range of the buffer
  (`interpret/utils.py: to_range`) and only knows indexers: a reshape fails with
  `AttributeError: 'ReshapeTransform' object has no attribute 'indices'`, and a
  bitcast would fail the same way. `_get`, `_store` and `_swap` below give the
  interpreter's callbacks of those names (which loads, stores and both ends of
  every DMA go through) a second path for those: read the part of the
  buffer the leading indexers select, through the interpreter as before, apply
  the remaining transforms to that value in numpy, and for writes undo them in
  reverse order and store the region back. A bitcast between widths follows
  Mosaic's packing along the second-minor axis, as `pltpu.bitcast`'s own CPU
  lowering does (`pallas/mosaic/primitives.py: _bitcast_lowering_rule`).
Nothing else: semaphores, DMAs and the kernel body interpret as they are.

Race detection is off (the region read-modify-write is not an atomic access
for it); the kernel's DMAs complete on wait, as the interpreter does by default.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
from unittest import mock

import jax
import numpy as np
from jax._src.pallas.mosaic.interpret import interpret_pallas_call as interpreter
from jax._src.state import indexing
from jax._src.state import types as state_types
from jax.experimental.pallas import tpu as pltpu

CHIPS = {6: (pltpu.ChipVersion.TPU_V6E, "TPU v6e"), 5: (pltpu.ChipVersion.TPU_V5E, "TPU v5e")}

# Where tpu-inference asks which TPU it runs on: names bound at import, each derived
# from `jax.devices()[0].device_kind` (which a CPU device can't be made to answer).
_RPA = "tpu_inference.kernels.ragged_paged_attention.v3."
_VERSION_USERS = (_RPA + "kernel", _RPA + "tuned_block_sizes", _RPA + "tuned_block_sizes_hd64")
_DEVICE_NAME_USERS = (_RPA + "tuned_block_sizes", _RPA + "tuned_block_sizes_hd64")


@contextlib.contextmanager
def tpu_kernels_interpreted(tpu_version: int = 6):
    """Within: Pallas TPU kernels interpret on the CPU as if on one chip of `tpu_version`."""
    chip, device_name = CHIPS[tpu_version]
    info = pltpu.get_tpu_info_for_chip(chip, 1)
    with contextlib.ExitStack() as stack:
        def patch(module, name, value):
            stack.enter_context(mock.patch.object(importlib.import_module(module), name, value))

        for module in _VERSION_USERS:
            patch(module, "get_tpu_version", lambda: tpu_version)
        for module in _DEVICE_NAME_USERS:
            patch(module, "get_device_name", lambda num_devices=None: device_name)
        stack.enter_context(mock.patch.object(pltpu, "get_tpu_info", lambda: info))
        for name, callback in (("get", _get), ("store", _store), ("swap", _swap)):
            stack.enter_context(mock.patch.object(interpreter, name, callback(getattr(interpreter, name))))
        stack.enter_context(pltpu.force_tpu_interpret_mode(pltpu.InterpretParams()))
        try:
            yield info
        finally:
            # The interpreter keeps simulated memory across calls; a failed kernel leaves it
            # poisoned ("must call reset" in InterpretParams' docs).
            pltpu.reset_tpu_interpret_mode_state()


# ---------------------------------------------------------------------------
# Reshaped and bitcast refs.


def _split(transforms):
    """(leading indexers, the rest from the first other transform on); None when there is no other."""
    transforms = jax.tree.map(int, transforms)  # as the callbacks do: indices arrive as numpy scalars
    for i, t in enumerate(transforms):
        if not isinstance(t, indexing.NDIndexer):
            return tuple(transforms[:i]), tuple(transforms[i:])
    return None


def _index(indexer) -> tuple:
    return tuple(i if isinstance(i, int) else slice(i.start, i.start + i.size * i.stride, i.stride)
                 for i in indexer.indices)


def _bitcast(x: np.ndarray, dtype) -> np.ndarray:
    """`pltpu.bitcast` in numpy: narrower values pack along the second-minor axis."""
    dtype = np.dtype(dtype)
    src, dst = x.dtype.itemsize, dtype.itemsize
    *lead, m, n = x.shape
    if src < dst:  # p values of rows (p*i .. p*i+p-1) become one value of row i
        p = dst // src
        x = np.ascontiguousarray(x.reshape(*lead, m // p, p, n).swapaxes(-1, -2))
        return x.view(dtype).reshape(*lead, m // p, n)
    if src > dst:
        p = src // dst
        y = np.ascontiguousarray(x).view(dtype).reshape(*lead, m, n, p)
        return np.ascontiguousarray(y.swapaxes(-1, -2)).reshape(*lead, m * p, n)
    return x.view(dtype)


def _forward(x: np.ndarray, t) -> np.ndarray:
    if isinstance(t, indexing.NDIndexer):
        return x[_index(t)]
    if isinstance(t, state_types.ReshapeTransform):
        return x.reshape(t.shape)
    if isinstance(t, state_types.BitcastTransform):
        return _bitcast(x, t.dtype)
    if isinstance(t, state_types.TransposeTransform):
        return x.transpose(t.permutation)
    raise NotImplementedError(f"ref transform {t} in TPU interpret mode")


def _read(x: np.ndarray, transforms) -> np.ndarray:
    for t in transforms:
        x = _forward(x, t)
    return np.ascontiguousarray(x)


def _write(x: np.ndarray, transforms, value: np.ndarray) -> np.ndarray:
    """`x` with `value` written where `transforms` view it (a new array)."""
    if not transforms:
        return np.asarray(value, x.dtype).reshape(x.shape)
    t, rest = transforms[0], transforms[1:]
    inner = _write(_forward(x, t), rest, value)
    if isinstance(t, indexing.NDIndexer):
        x = x.copy()
        x[_index(t)] = inner
        return x
    if isinstance(t, state_types.ReshapeTransform):
        return inner.reshape(x.shape)
    if isinstance(t, state_types.BitcastTransform):
        return _bitcast(inner, x.dtype)
    if isinstance(t, state_types.TransposeTransform):
        return inner.transpose(np.argsort(t.permutation))
    raise NotImplementedError(f"ref transform {t} in TPU interpret mode")


def _get(original):
    impl = original.__wrapped__  # DMAs call `get.__wrapped__`

    @functools.wraps(impl)
    def get(token, device_id, local_core_id, memory_space, buffer_id, transforms, *args, **kwargs):
        parts = _split(transforms)
        if parts is None:
            return impl(token, device_id, local_core_id, memory_space, buffer_id, transforms, *args, **kwargs)
        region, rest = parts
        token, value = impl(token, device_id, local_core_id, memory_space, buffer_id, region, *args, **kwargs)
        return token, _read(value, rest)

    return _with_failure_handling(get, original)


def _store(original):
    impl, read = original.__wrapped__, interpreter.get.__wrapped__

    @functools.wraps(impl)
    def store(token, device_id, local_core_id, memory_space, buffer_id, transforms, val, *args, **kwargs):
        parts = _split(transforms)
        if parts is None:
            return impl(token, device_id, local_core_id, memory_space, buffer_id, transforms, val, *args, **kwargs)
        region, rest = parts
        common = {k: v for k, v in kwargs.items() if k in ("src_device_id", "src_local_core_id", "source_info")}
        _, old = read(token, device_id, local_core_id, memory_space, buffer_id, region, **common)
        new = _write(old, rest, np.asarray(val))
        return impl(token, device_id, local_core_id, memory_space, buffer_id, region, new, *args, **kwargs)

    return _with_failure_handling(store, original)


def _swap(original):
    impl = original.__wrapped__
    read, write = interpreter.get.__wrapped__, interpreter.store.__wrapped__

    @functools.wraps(impl)
    def swap(token, device_id, local_core_id, memory_space, buffer_id, transforms, val, mask, **kwargs):
        parts = _split(transforms)
        if parts is None:
            return impl(token, device_id, local_core_id, memory_space, buffer_id, transforms, val, mask, **kwargs)
        if mask is not None:
            raise NotImplementedError("masked swap through a reshaped or bitcast ref")
        region, rest = parts
        _, old = read(token, device_id, local_core_id, memory_space, buffer_id, region, **kwargs)
        write(token, device_id, local_core_id, memory_space, buffer_id, region,
              _write(old, rest, np.asarray(val)), **kwargs)
        return token, _read(old, rest)

    return _with_failure_handling(swap, original)


def _with_failure_handling(impl, original):
    """Wrapped like the interpreter's own callbacks (`fail_on_exception`), `__wrapped__` = `impl`."""
    wrapped = interpreter.fail_on_exception(impl)
    wrapped.__wrapped__ = impl
    return wrapped
