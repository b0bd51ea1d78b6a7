"""A fix to tpu-inference 0.32.0's runner that every host needs, TPU included.

Under vLLM's default async scheduling, `TPUModelRunner._update_placeholder` gives
each request a placeholder token while its sampled token is in flight, and the
next step's `_modify_prev_results` fills it in, but only for requests still in
the batch. A request preempted (or not scheduled) in between keeps the 0, and
when it resumes its recomputed prefill reads token 0 where the sampled token
was. The fix fills the placeholders of departed requests first, exactly as the
original fills the others. The whole story, with measurements, is in
docs/async-scheduling.md; the CPU-only half of it is a host patch (`host.py`).
"""

from __future__ import annotations

import functools

from jaxllm.vllm_plugin.patching import Patch, install


def install_all() -> None:
    install(Patch("tpu_inference.runner.tpu_runner", "TPUModelRunner._modify_prev_results",
                  "fill the in-flight placeholder of requests that left the batch (docs/async-scheduling.md)",
                  _filling_departed_placeholders))


def _filling_departed_placeholders(modify_prev_results):
    @functools.wraps(modify_prev_results)
    def wrapper(runner):
        _fill_departed_placeholders(runner)
        return modify_prev_results(runner)
    return wrapper


def _fill_departed_placeholders(runner) -> None:
    """Give requests that left the batch their step-N tokens in place of the placeholders."""
    pre = runner._pre_async_results
    if pre is None or getattr(pre, "is_continue_decode", False):
        return  # (the continue-decode branch has the same skip; it is off by default and not fixed here)
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

    # The same extraction as the original (step N's tokens are already on their way to the host).
    sampled = runner_utils.host_extract_sampled_tokens(
        runner, pre.spec_decode_metadata, pre.next_tokens,
        pre.logits_indices_selector, pre.discard_sampled_tokens_req_indices,
        len(pre.req_ids))
    for pre_req_idx, req_id, req_state in departed:
        sampled_ids = sampled[pre_req_idx]
        if not sampled_ids:
            continue
        # As `_update_placeholder` counts them: 1, plus one per scheduled draft token.
        num_placeholders = 1 + len(pre.scheduler_output.scheduled_spec_decode_tokens.get(req_id, ()))
        del req_state.output_token_ids[-num_placeholders:]
        req_state.output_token_ids.extend(sampled_ids)
