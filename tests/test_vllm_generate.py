"""Llama 4 and Gemma 4 served end to end by vLLM (LLM.generate) with tpu-inference's runner on the CPU.

Greedy tokens must equal Hugging Face's greedy decoding. The reference decodes by
repeated full forwards (no KV cache), the plain definition of the model.
"""

import gc

import pytest
import torch

from jaxllm.checkpoints import cached_checkpoint

PROMPTS = ["The quick brown fox", "Hello, my name is", "In machine learning, attention is"]
MAX_TOKENS = 24  # decode past the tiny Llama 4's 16-token chunk and the tiny Gemma 4's 8-token window


@pytest.fixture(scope="module")
def checkpoint():
    return cached_checkpoint("llama4", "tiny")


def hf_greedy(path, prompt_ids: list[list[int]], max_tokens: int, auto_class=None) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    model = (auto_class or AutoModelForCausalLM).from_pretrained(str(path), dtype=torch.float32)
    outputs = []
    for ids in prompt_ids:
        ids = list(ids)
        start = len(ids)
        with torch.no_grad():
            for _ in range(max_tokens):
                ids.append(int(model(torch.tensor([ids]), use_cache=False).logits[0, -1].argmax()))
        outputs.append(ids[start:])
    return outputs


def generate(path, **engine_args):
    from vllm import LLM, SamplingParams

    llm = LLM(model=str(path), max_model_len=256, max_num_seqs=8, dtype="float32",
              num_gpu_blocks_override=64, seed=0, **engine_args)
    try:
        outputs = llm.generate(PROMPTS, SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True))
        return [o.prompt_token_ids for o in outputs], [list(o.outputs[0].token_ids) for o in outputs]
    finally:
        del llm
        gc.collect()


@pytest.mark.parametrize("engine_args", [
    {},  # the plain Llama4ForCausalLM checkpoint: ours by default
    {"hf_overrides": {"architectures": ["JaxLlama4ForCausalLM"]}},
], ids=["default", "hf-overrides"])
def test_greedy_generation_matches_hf(checkpoint, engine_args):
    prompt_ids, tokens = generate(checkpoint, **engine_args)
    assert tokens == hf_greedy(checkpoint, prompt_ids, MAX_TOKENS)


@pytest.mark.parametrize("multimodal", [False, True], ids=["text", "multimodal"])
def test_gemma4_greedy_generation_matches_hf(multimodal):
    from transformers import AutoModelForImageTextToText

    path = cached_checkpoint("gemma4", "tiny", multimodal=multimodal)
    # Text-only serving of a multimodal checkpoint: no image or video inputs.
    extra = {"limit_mm_per_prompt": {"image": 0, "video": 0}} if multimodal else {}
    prompt_ids, tokens = generate(path, **extra)
    assert tokens == hf_greedy(path, prompt_ids, MAX_TOKENS, AutoModelForImageTextToText if multimodal else None)


def test_dummy_weights_generate(checkpoint):
    """load_format="dummy": random weights from __init__, no checkpoint read."""
    _, tokens = generate(checkpoint, load_format="dummy")
    assert all(len(t) == MAX_TOKENS for t in tokens)
