"""Make tpu-inference 0.32.0's runner exact under vLLM's default async scheduling.

With ``async_scheduling`` on (vLLM's default), tpu-inference's ``TPUModelRunner``
prepares step N+1 on the host while step N still runs, and feeds step N's sampled
tokens into step N+1 on the device. Two faults made greedy outputs differ from
the same run with async scheduling off. Both are fixed here from outside
tpu-inference, by replacing two names, without editing its files.

1. Leaked placeholder after preemption (any host, TPU included)
---------------------------------------------------------------
``tpu_inference/runner/tpu_runner.py``:

- ``TPUModelRunner._update_placeholder`` (step N) appends a placeholder ``0`` to
  ``CachedRequestState.output_token_ids`` for every request whose token is still
  in flight.
- ``TPUModelRunner._modify_prev_results`` (step N+1, after
  ``persistent_batch_manager.update_states``) replaces those placeholders with
  the real tokens, but skips every request that is no longer in the input batch.
  A request leaves the batch when step N+1 preempts it or simply does not
  schedule it; ``update_states`` removes it from the batch and keeps its
  ``CachedRequestState``, placeholder included.
- vLLM's scheduler delivers that step-N token to the request and does not resume
  it while such output is in flight, so on resume ``num_output_tokens`` counts
  the token and the trim in ``update_states`` removes nothing.
  ``InputBatch.add_request`` then copies prompt + ``output_token_ids``, with the
  ``0``, into ``token_ids_cpu``, and the recomputed prefill reads token 0 where
  the sampled token was: every later token of that request can change.

Measured (tiny Llama, 12 prompts of ~27 tokens, 48 greedy tokens, 12 KV blocks of
16 tokens, 13-14 preemptions): with async scheduling on (fix 2 installed), 10 of
12 outputs differed from HF greedy in each of 2 runs; with it off, 0 of 12; with
this fix, 0 of 12 in each of 2 runs.

Fix (``_fill_departed_placeholders``): ``_modify_prev_results`` is wrapped so
that, first, for each request of step N that has left the batch but is still
alive (same ``CachedRequestState`` object in ``runner.requests``), the trailing
placeholders are replaced by the tokens step N sampled, extracted exactly as the
original does (``runner_utils.host_extract_sampled_tokens``). Between
``_update_placeholder`` and here nothing touches a departed request's
``output_token_ids`` (``update_states`` only trims *scheduled* requests), so the
placeholders are still its last entries. Requests still in the batch are left
to the original method, unchanged. This is what the runner should do anywhere,
TPU included, so it is applied on every host. The ``is_continue_decode``
branch (off by default) has the same skip and is not touched here.

2. Host buffers aliased by device arrays (CPU backend only)
-----------------------------------------------------------
``TPUModelRunner._prepare_inputs`` fills persistent numpy buffers in place every
step -- ``self.positions_cpu``, and ``self.device_buffer.buffer`` (the
``tpu_inference.utils.DeviceBuffer`` blob packing ``input_ids``,
``query_start_loc``, ``seq_lens``, ``logits_indices`` and the block tables) --
and uploads views of them with ``tpu_inference.utils.device_array``
(``jax.device_put``). On JAX's CPU backend (jax 0.11.2) ``device_put`` of a
numpy array whose data is 64-byte aligned is zero-copy: the "device" array *is*
the numpy memory (same ``unsafe_buffer_pointer()``; writing the numpy array
changes the jax array). ``device_put(..., may_alias=False)`` aliases all the same,
so forcing copies that way cannot help (a likely reason an earlier attempt
failed). Whether the runner's buffers are aligned is up to malloc, differently in
each process (``positions_cpu`` was aligned in 11 of 30 engine processes here),
which is why only some engines fail.

With async scheduling the model of step N cannot start before step N-1's
sampled tokens exist (``_substitute_placeholder_token`` waits for them), while
the host goes on and prepares step N+1 in the same buffers. On a busy CPU the
model of step N then reads ``positions`` only after they were rewritten for step
N+1 (in a steady decode batch, one further for every request): wrong rotary
positions, wrong logits for every request of the batch at once, from a decode
step on; prefill and prompt logprobs, with nothing in flight before them, stay
right. Measured on the tiny Llama (8 prompts under 8 tokens, 32 greedy tokens,
both cores busy): engines whose ``positions_cpu`` was aligned diverged from HF
greedy in 7 of 7 natural runs and in 9 of 10 runs with alignment forced; engines
with unaligned ``positions_cpu`` never did (0 of 13). The blob is aliased as
often, but is consumed at once by the ``jnp.split`` in
``DeviceBuffer.unpack_arrays``, which has no input to wait for; no failure was
traced to it (the fix covers it anyway).

Fix (``_copy_host_buffers_on_put``): off TPU, ``tpu_inference.utils.device_array``
(and the modules' copies of that name) is wrapped so that every numpy array it
uploads is first copied into a fresh array nobody else holds. If JAX aliases the
copy, it aliases memory only that device array owns (JAX keeps the numpy object
alive), so the host's in-place writes for the next step can no longer reach a
step in flight. The cost is a copy of a few KiB per step. With the fix: 0 of 10
natural runs (4 with ``positions_cpu`` aligned) and 0 of 10 forced-alignment
runs diverged. A TPU's ``device_put`` copies host memory into HBM, so nothing is
installed there (not verified on TPU hardware from here).

The ``apply()`` below installs fix 1 everywhere and fix 2 only off TPU.
"""

from __future__ import annotations

import functools
import importlib.abc
import sys

import numpy as np
from vllm.logger import init_logger

logger = init_logger("vllm.jaxllm")

_RUNNER_MODULE = "tpu_inference.runner.tpu_runner"
_PATCHED = "_jaxllm_runner_fix"


def apply(*, host_adaptations: bool | None = None) -> None:
    """Install both fixes in this process; idempotent, cheap, imports no runner code.

    ``host_adaptations``: whether to install the aliasing fix (2); by default
    where JAX's backend is not a TPU (``host.tpu_present()``). The preemption
    fix (1) is installed everywhere. Fix 1 patches ``tpu_runner``, which only
    engine processes import (about 3 s), so it is applied when that module is
    first imported, or at once if it already is.
    """
    if host_adaptations is None:
        from jaxllm.vllm_plugin import host
        host_adaptations = not host.tpu_present()
    when_imported(_RUNNER_MODULE, _fix_leaked_placeholders)
    if host_adaptations:
        _copy_host_buffers_on_put()
    logger.debug("jaxllm: runner fixes for async scheduling installed (placeholders%s)",
                 ", host buffer copies" if host_adaptations else "")


def installed() -> dict[str, bool]:
    """Which fixes are in place in this process (fix 1 counts once its hook is set)."""
    import tpu_inference.utils as tpu_utils
    runner = sys.modules.get(_RUNNER_MODULE)
    return {
        "leaked_placeholder": (
            _fix_leaked_placeholders in _PENDING.get(_RUNNER_MODULE, ())
            or (runner is not None and getattr(
                runner.TPUModelRunner._modify_prev_results, _PATCHED, False))),
        "host_buffer_aliasing": getattr(tpu_utils.device_array, _PATCHED, False),
    }


# --- fix 1: leaked placeholder ----------------------------------------------


def _fix_leaked_placeholders(module=None) -> None:
    TPUModelRunner = (module or sys.modules[_RUNNER_MODULE]).TPUModelRunner
    original = TPUModelRunner._modify_prev_results
    if getattr(original, _PATCHED, False):
        return

    @functools.wraps(original)
    def _modify_prev_results(self):
        _fill_departed_placeholders(self)
        return original(self)

    setattr(_modify_prev_results, _PATCHED, True)
    TPUModelRunner._modify_prev_results = _modify_prev_results


def _fill_departed_placeholders(runner) -> None:
    """Give requests that left the batch their step-N tokens in place of the placeholders."""
    pre = runner._pre_async_results
    if pre is None or getattr(pre, "is_continue_decode", False):
        return
    departed = []
    for pre_req_idx, req_state, _ in pre.request_seq_lens:
        req_id = pre.req_ids[pre_req_idx]
        if req_id in runner.input_batch.req_id_to_index:
            continue  # still in the batch: the original method replaces its placeholder
        if runner.requests.get(req_id) is not req_state:
            continue  # finished (or replaced by a new request with the same id)
        departed.append((pre_req_idx, req_id, req_state))
    if not departed:
        return

    from tpu_inference.runner import utils as runner_utils

    # The same extraction as the original (step N's tokens are already on their
    # way to the host: `copy_to_host_async` in `_sample_from_logits`).
    sampled = runner_utils.host_extract_sampled_tokens(
        runner, pre.spec_decode_metadata, pre.next_tokens,
        pre.logits_indices_selector, pre.discard_sampled_tokens_req_indices,
        len(pre.req_ids))
    for pre_req_idx, req_id, req_state in departed:
        sampled_ids = sampled[pre_req_idx]
        if not sampled_ids:
            continue
        # As `_update_placeholder` counts them: 1, plus one per scheduled draft token.
        num_placeholders = 1 + len(
            pre.scheduler_output.scheduled_spec_decode_tokens.get(req_id, ()))
        del req_state.output_token_ids[-num_placeholders:]
        req_state.output_token_ids.extend(sampled_ids)


# --- fix 2: host buffers aliased by device arrays -----------------------------


def _own_copy(x):
    return np.array(x, copy=True) if isinstance(x, np.ndarray) else x


def _copy_host_buffers_on_put() -> None:
    import jax
    import tpu_inference.utils as tpu_utils

    original = tpu_utils.device_array
    if getattr(original, _PATCHED, False):
        return

    @functools.wraps(original)
    def device_array(mesh, *args, sharding=None, **kwargs):
        args = jax.tree_util.tree_map(_own_copy, args)
        return original(mesh, *args, sharding=sharding, **kwargs)

    setattr(device_array, _PATCHED, True)
    tpu_utils.device_array = device_array
    # Modules imported from now on bind the wrapper; rebind those that already
    # did `from tpu_inference.utils import device_array`.
    for module in list(sys.modules.values()):
        if (getattr(module, "__name__", "").startswith("tpu_inference.")
                and getattr(module, "device_array", None) is original):
            module.device_array = device_array


# --- apply a patch when a module is first imported ----------------------------

_PENDING: dict[str, list] = {}


def when_imported(name: str, patch) -> None:
    module = sys.modules.get(name)
    if module is not None:
        patch(module)
        return
    callbacks = _PENDING.setdefault(name, [])
    if patch not in callbacks:
        callbacks.append(patch)
    if not any(isinstance(f, _PatchAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _PatchAfterImport())


class _PatchAfterImport(importlib.abc.MetaPathFinder):
    """Finds a pending module with the other finders, and patches it once it has executed."""

    def find_spec(self, fullname, path, target=None):
        if fullname not in _PENDING:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _PatchingLoader(spec.loader, fullname)
                return spec
        return None


class _PatchingLoader(importlib.abc.Loader):

    def __init__(self, loader, name):
        self._loader, self._name = loader, name

    def __getattr__(self, attr):  # get_source, get_code, ... for tracebacks and inspect
        return getattr(self._loader, attr)

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        module.__loader__ = module.__spec__.loader = self._loader  # leave no trace
        for patch in _PENDING.pop(self._name, ()):
            patch(module)
