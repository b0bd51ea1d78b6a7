"""bf16, as models are served: our bf16 logits against Hugging Face's bf16 logits, same checkpoint.

Two bf16 implementations of the same model differ by rounding: each rounds its
activations to 8 significant bits at different points (fused ops, accumulation
order). So the bound is relative to bf16's own error, measured in the same test:
HF bf16 against HF fp32. Ours must stay within BF16_SLACK times that distance of
HF bf16, in the maximum and in the mean over log-probabilities of the whole
vocabulary at every position of a prompt that crosses the chunk / window (prefill,
then decode steps). Measured on the tiny checkpoints: ours is 0.74-1.13x as far from
HF bf16 as HF bf16 is from HF fp32 (max 0.044 / 0.13 / 0.50 for Llama 4, Gemma 4,
Gemma 4 MoE; these random models have flat, sensitive logits). A real defect (a
missing norm weight, a wrong scale, a misplaced mask) moves logprobs by O(1) at
most positions, which the mean catches. Where HF bf16's top token leads by more
than twice our distance from it, our top token must be the same.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from harness import Engine, auto_mesh, load_model
from jaxllm.checkpoints import GEMMA4_MOE, cached_checkpoint
from jaxllm.model.gemma4 import JaxGemma4ForCausalLM
from jaxllm.model.llama4 import JaxLlama4ForCausalLM

BF16_SLACK = 3.0
SEQ = list(np.random.default_rng(3).integers(10, 1000, 40))  # crosses Llama 4's chunk (16), Gemma 4's window (8)
PREFILL = 30

CASES = {
    "llama4": (JaxLlama4ForCausalLM, "llama4", {}),
    "gemma4": (JaxGemma4ForCausalLM, "gemma4", {}),
    "gemma4-moe": (JaxGemma4ForCausalLM, "gemma4", dict(enable_moe_block=True, **GEMMA4_MOE["tiny"])),
}


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return x - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True)) - x.max(-1, keepdims=True)


def hf_logprobs(path, dtype) -> np.ndarray:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).eval()
    with torch.no_grad():
        return log_softmax(model(torch.tensor([SEQ]), use_cache=False).logits[0].float().numpy())


@pytest.mark.parametrize("case", CASES)
def test_bf16_logprobs_are_as_close_to_hf_bf16_as_bf16_is_to_fp32(case):
    cls, arch, overrides = CASES[case]
    path = cached_checkpoint(arch, "tiny", **overrides)
    model, mesh = load_model(cls, path, mesh=auto_mesh(), dtype="bfloat16")
    engine = Engine(model, mesh, num_pages=64, pages_per_req=16)
    request = engine.add(SEQ)
    logits = list(engine.step([(request, PREFILL)])[0])
    while request.computed < len(SEQ):
        logits += list(engine.step([(request, 1)])[0])
    ours = log_softmax(np.asarray(logits, np.float32))
    reference, exact = hf_logprobs(path, torch.bfloat16), hf_logprobs(path, torch.float32)
    bf16_error, distance = np.abs(reference - exact), np.abs(ours - reference)
    assert bf16_error.max() > 0  # the reference really ran in bf16
    assert distance.max() <= BF16_SLACK * bf16_error.max(), (distance.max(), bf16_error.max())
    assert distance.mean() <= BF16_SLACK * bf16_error.mean(), (distance.mean(), bf16_error.mean())
    top2 = np.sort(reference, -1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 2 * distance.max()
    np.testing.assert_array_equal(ours.argmax(-1)[clear], reference.argmax(-1)[clear])

