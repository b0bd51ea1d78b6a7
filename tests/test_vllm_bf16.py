"""bf16 end to end: vLLM serving a checkpoint in bf16, against Hugging Face bf16 (and fp32).

Prompt logprobs of every prompt token (which greedy ties can't reorder), bounded as in
test_bf16.py: within BF16_SLACK times bf16's own error (HF bf16 against HF fp32), in the
maximum and the mean. Its own module: it starts engines (see conftest.py).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from jaxllm.checkpoints import cached_checkpoint
from test_bf16 import BF16_SLACK, CASES, SEQ, hf_logprobs


@pytest.mark.parametrize("case", ["llama4", "gemma4"])
def test_vllm_bf16_prompt_logprobs_are_as_close_to_hf_bf16(case):
    """The same bound end to end: vLLM serving the checkpoint in bf16 (prompt logprobs of every
    prompt token, which greedy ties can't reorder) against HF bf16 and fp32."""
    import gc

    from vllm import LLM, SamplingParams

    _, arch, overrides = CASES[case]
    path = cached_checkpoint(arch, "tiny", **overrides)
    llm = LLM(model=str(path), dtype="bfloat16", max_model_len=256, max_num_seqs=4, num_gpu_blocks_override=64,
              seed=0)
    try:
        output = llm.generate([{"prompt_token_ids": [int(t) for t in SEQ]}],
                              SamplingParams(max_tokens=1, prompt_logprobs=0))[0]
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
    # prompt_logprobs[i] holds the logprob of token i given the tokens before it (None for the first).
    ours = np.array([next(iter(step.values())).logprob for step in output.prompt_logprobs[1:]])
    positions, tokens = np.arange(len(SEQ) - 1), np.asarray(SEQ[1:])
    reference = hf_logprobs(path, torch.bfloat16)[positions, tokens]
    exact = hf_logprobs(path, torch.float32)[positions, tokens]
    bf16_error, distance = np.abs(reference - exact), np.abs(ours - reference)
    assert bf16_error.max() > 0
    assert distance.max() <= BF16_SLACK * bf16_error.max(), (distance.max(), bf16_error.max())
    assert distance.mean() <= BF16_SLACK * bf16_error.mean(), (distance.mean(), bf16_error.mean())
