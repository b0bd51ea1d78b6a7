"""The window-aware KV cache (`jaxllm.vllm_plugin.kv_cache`) through `vllm.LLM`.

The tiny checkpoints have an 8-token window (Gemma 4, 5 sliding layers of 2 KV heads x
32 and 1 global layer of 1 x 64: two row layouts in one pool) and a 16-token chunk
(Llama 4, 3 chunked layers and 1 global). Prompts of up to 100 tokens and 60 greedy
tokens span many windows, so sliding and chunked groups free blocks all along.

Reference: the same engine with every layer keeping the full context
(`JAXLLM_WINDOWED_KV_CACHE=0`, tpu-inference's own sizing). Greedy tokens must be
identical and logprobs equal within 1e-5 (fp32; the pages differ, the arithmetic
does not, so anything a freed or foreign page leaked into would move them by far
more). The window-aware engines start with every cache page NaN
(`JAXLLM_POISON_KV_CACHE=1`), so a read of a page never written, or of the null
block that replaces freed ones, would turn logprobs into NaN.
"""

from __future__ import annotations

import gc

import numpy as np
import pytest

PROMPT_LENS = (5, 40, 70, 100)
CROWD_LENS = (40, 60, 80, 100, 50, 70, 90, 30)  # together too many for a small pool
MAX_TOKENS = 60
MAX_MODEL_LEN = 256
# Small pools (blocks), with max_model_len 160: just above what vLLM's start-up check asks
# for (one request of max_model_len, with a whole prefill chunk in flight).
SMALL_POOL = {"llama4": 28, "gemma4": 40}      # prefill chunks of 32 tokens
CROWD_POOL = 64  # Gemma 4: preempts; Llama 4 (3 of 4 layers chunked) got through pools
                 # of 28-44 blocks with no preemption, vLLM's admission gate holding back requests
LOGPROB_ATOL = 1e-5


def _prompts(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(2, 1000, n).tolist() for n in lengths]  # tiny vocabularies have 1024 ids


def _run(monkeypatch, arch, windowed, batches, **engine_args):
    """Greedy tokens and logprobs for each batch of prompts, run one after another in one
    fresh engine; and the engine's counters (preemptions, prefix-cache hits)."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from jaxllm.checkpoints import cached_checkpoint

    monkeypatch.setenv("JAXLLM_WINDOWED_KV_CACHE", "1" if windowed else "0")
    monkeypatch.setenv("JAXLLM_POISON_KV_CACHE", "1" if windowed else "0")
    args = dict(model=str(cached_checkpoint(arch, "tiny")), max_model_len=MAX_MODEL_LEN, max_num_seqs=8,
                dtype="float32", seed=0, disable_log_stats=False, num_gpu_blocks_override=256)
    args.update(engine_args)
    llm = LLM(**args)
    try:
        results = []
        for prompts in batches:
            outputs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompts],
                                   SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True, logprobs=0),
                                   use_tqdm=False)
            tokens = [list(o.outputs[0].token_ids) for o in outputs]
            logprobs = [[step[t].logprob for step, t in zip(o.outputs[0].logprobs, toks)]
                        for o, toks in zip(outputs, tokens)]
            results.append((tokens, logprobs))
        counters = {m.name: m.value for m in llm.get_metrics() if m.name in
                    ("vllm:num_preemptions", "vllm:prefix_cache_hits", "vllm:prefix_cache_queries")}
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
    return results, counters


def _assert_same(got, expected):
    (tokens, logprobs), (ref_tokens, ref_logprobs) = got, expected
    assert tokens == ref_tokens
    for lp, ref in zip(logprobs, ref_logprobs):
        assert np.isfinite(lp).all()
        np.testing.assert_allclose(lp, ref, atol=LOGPROB_ATOL, rtol=0)


@pytest.fixture(scope="module")
def monkeymodule():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


@pytest.fixture(scope="module", params=["llama4", "gemma4"])
def reference(request, monkeymodule):
    """Full-length caches: the batch, the longest prompt alone, and the crowd."""
    arch = request.param
    prompts = _prompts(PROMPT_LENS)
    results, _ = _run(monkeymodule, arch, False, [prompts, prompts[-1:], _prompts(CROWD_LENS, seed=1)])
    return arch, prompts, results


def test_windowed_cache_gives_identical_outputs_and_reuses_cached_prefixes(reference, monkeymodule):
    """Window-aware, NaN-poisoned: the same outputs; the longest prompt (longer than every
    window and chunk) repeated alone hits the prefix cache and still gives the same output."""
    arch, prompts, expected = reference
    results, counters = _run(monkeymodule, arch, True, [prompts, prompts[-1:]])
    _assert_same(results[0], expected[0])
    _assert_same(results[1], expected[1])
    # The repeat finds its prompt's blocks (but the last, partial one) in the cache.
    assert counters["vllm:prefix_cache_hits"] >= PROMPT_LENS[-1] // 16 * 16


@pytest.mark.parametrize("reference", ["gemma4"], indirect=True)
def test_windowed_cache_survives_preemption(reference, monkeymodule):
    """A pool too small for the crowd: requests are preempted and recomputed, outputs unchanged."""
    arch, _, expected = reference
    results, counters = _run(monkeymodule, arch, True, [_prompts(CROWD_LENS, seed=1)],
                             num_gpu_blocks_override=CROWD_POOL, max_model_len=160)
    assert counters["vllm:num_preemptions"] > 0, "the pool no longer forces preemptions; shrink it"
    _assert_same(results[0], expected[2])


def test_freed_blocks_return_to_the_pool(reference, monkeymodule):
    """One request growing to 160 tokens in a pool that could not hold it if sliding or chunked
    layers kept their blocks (10 + 3 x 10 = 40 of 16 tokens for Llama 4; 5 of 32 tokens for the
    global layer + 5 x 10 of 16 for the sliding ones = 55 for Gemma 4):
    it completes with no preemption, so the blocks that left its windows were reused."""
    arch, prompts, expected = reference
    results, counters = _run(monkeymodule, arch, True, [prompts[-1:]], num_gpu_blocks_override=SMALL_POOL[arch],
                             max_num_batched_tokens=32, max_model_len=160)
    assert counters["vllm:num_preemptions"] == 0
    _assert_same(results[0], expected[1])
