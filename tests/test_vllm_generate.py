"""Llama 4 and Gemma 4 served end to end by vLLM (LLM.generate) with tpu-inference's runner on the CPU.

Greedy tokens must equal Hugging Face's greedy decoding, and each sampled token's
logprob HF's log-softmax within 1e-4 (fp32; our logits differ from HF's by ~1e-5,
a wrong mask or weight by > 1e-2). The reference decodes by repeated full
forwards (no KV cache), the plain definition of the model. One prompt is longer
than the tiny Llama 4's 16-token chunk and the tiny Gemma 4's 8-token window, and
decoding runs past both.
"""

import gc

import numpy as np
import pytest
import torch

from jaxllm.checkpoints import cached_checkpoint

PROMPTS = ["The quick brown fox", "Hello, my name is",
           "In machine learning, attention is a mechanism that lets every token look at the others, and"]
MAX_TOKENS = 24
LOGPROB_ATOL = 1e-4

CASES = {
    # name: (arch, checkpoint overrides, engine args)
    "llama4-mixed": ("llama4", {}, {}),  # MoE every 2nd layer, plain checkpoint: ours by default
    "llama4-dense": ("llama4", {"moe_layers": []}, {}),
    "llama4-moe": ("llama4", {"interleave_moe_layer_step": 1}, {}),
    "llama4-hf-overrides": ("llama4", {}, {"hf_overrides": {"architectures": ["JaxLlama4ForCausalLM"]}}),
    "llama4-tp2": ("llama4", {}, {"tensor_parallel_size": 2}),
    "llama4-tp4": ("llama4", {}, {"tensor_parallel_size": 4}),
    # --enable-expert-parallel: each device holds whole experts (1 of the tiny models' 4 at TP 4).
    "llama4-tp2-ep": ("llama4", {}, {"tensor_parallel_size": 2, "enable_expert_parallel": True}),
    "llama4-tp4-ep": ("llama4", {}, {"tensor_parallel_size": 4, "enable_expert_parallel": True}),
    "gemma4-dense": ("gemma4", {}, {}),
    "gemma4-moe": ("gemma4", {"enable_moe_block": True}, {}),
    "gemma4-tp2": ("gemma4", {}, {"tensor_parallel_size": 2}),
    "gemma4-moe-tp2": ("gemma4", {"enable_moe_block": True}, {"tensor_parallel_size": 2}),
    "gemma4-moe-tp2-ep": ("gemma4", {"enable_moe_block": True}, {"tensor_parallel_size": 2,
                                                                  "enable_expert_parallel": True}),
    "gemma4-tp4": ("gemma4", {"enable_moe_block": True}, {"tensor_parallel_size": 4}),
    "gemma4-tp4-ep": ("gemma4", {"enable_moe_block": True}, {"tensor_parallel_size": 4,
                                                              "enable_expert_parallel": True}),
    # Text-only serving of a multimodal checkpoint: no image or video inputs.
    "gemma4-multimodal": ("gemma4", {"multimodal": True}, {"limit_mm_per_prompt": {"image": 0, "video": 0}}),
}


def hf_greedy(path, prompt_ids, max_tokens, multimodal=False):
    """HF's greedy tokens and their logprobs, by full forwards."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    auto = AutoModelForImageTextToText if multimodal else AutoModelForCausalLM
    model = auto.from_pretrained(str(path), dtype=torch.float32)
    tokens, logprobs = [], []
    for ids in prompt_ids:
        ids, start, chosen = list(ids), len(ids), []
        with torch.no_grad():
            for _ in range(max_tokens):
                logp = torch.log_softmax(model(torch.tensor([ids]), use_cache=False).logits[0, -1].double(), -1)
                ids.append(int(logp.argmax()))
                chosen.append(float(logp[ids[-1]]))
        tokens.append(ids[start:])
        logprobs.append(chosen)
    return tokens, logprobs


def generate(path, **engine_args):
    from vllm import LLM, SamplingParams

    llm = LLM(model=str(path), max_model_len=256, max_num_seqs=8, dtype="float32",
              num_gpu_blocks_override=64, seed=0, **engine_args)
    try:
        outputs = llm.generate(PROMPTS, SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True,
                                                       logprobs=1))
        tokens = [list(o.outputs[0].token_ids) for o in outputs]
        logprobs = [[step[t].logprob for step, t in zip(o.outputs[0].logprobs, toks)]
                    for o, toks in zip(outputs, tokens)]
        return [o.prompt_token_ids for o in outputs], tokens, logprobs
    finally:
        del llm
        gc.collect()


# In `make test-all` only: each varies one setting that a fast case already runs (dense and all-MoE
# Llama 4: llama4-mixed has both kinds of layer; dense Gemma 4 at TP 2: the MoE cases at TP 2). The MoE
# models at TP 2 and 4, with and without expert parallelism, stay in `make test`.
SLOW_CASES = {"llama4-dense", "llama4-moe", "gemma4-tp2"}


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow) if c in SLOW_CASES else c for c in CASES])
def test_greedy_tokens_and_logprobs_match_hf(case):
    arch, overrides, engine_args = CASES[case]
    path = cached_checkpoint(arch, "tiny", **overrides)
    prompt_ids, tokens, logprobs = generate(path, **engine_args)
    assert max(map(len, prompt_ids)) > 16
    expected_tokens, expected_logprobs = hf_greedy(path, prompt_ids, MAX_TOKENS, overrides.get("multimodal", False))
    assert tokens == expected_tokens
    np.testing.assert_allclose(logprobs, expected_logprobs, atol=LOGPROB_ATOL, rtol=0)


def test_dummy_weights_generate():
    """load_format="dummy": random weights from __init__, no checkpoint read."""
    _, tokens, _ = generate(cached_checkpoint("llama4", "tiny"), load_format="dummy")
    assert all(len(t) == MAX_TOKENS for t in tokens)
