"""Quantized serving through `vllm.LLM`: fp8 KV cache, Qwix weight quantization, an FP8 checkpoint.

Closeness. Quantized runs are compared with an unquantized reference by teacher forcing:
each engine scores the same sequences (prompt + the reference's greedy continuation)
with `prompt_logprobs`, so every position is compared on the same context however
early greedy decoding would part. Two numbers per run, each with a bound:
- `mean |Δlogprob|`: the mean over all scored positions of the difference in the
  logprob of the reference's token (nats);
- greedy agreement: the share of continuation positions where the reference's greedy
  token is still the run's top-1 (its rank is 1).
The bounds are set from what quantization costs on these models (measured: see
MEASURED) with about 2x margin, and are far below what a wrong scale or layout costs:
tests/test_quantization.py and tests/test_attention.py check those parts exactly; here
a K/V scale off by 2x, or Qwix's scales on the wrong axis, would give garbage logits,
mean |Δlogprob| of the order of the logprob spread itself (≥ 0.5 nats on Llama 4, ≥ 0.1 on
the flat-logit Gemma 4), and greedy agreement near chance.

Models. The tiny Llama 4 (MoE every 2nd layer, so Qwix quantizes routed experts too)
and the tiny Gemma 4 with its MoE block. The tiny Gemma 4's random q/k norms make its
attention nearly one-hot (scale 1.0 over unit-RMS heads of 32: scores with std 5.7),
so bf16 rounding alone flips a third of its greedy tokens against fp32. The test copy
scales its q_norm weights by 1/4 (scores' std 1.4); then bf16 and fp32 agree on 96% of
positions, and quantization noise can be told from chaos.

Window-aware fp8 caches: with every page NaN at start (`JAXLLM_POISON_KV_CACHE=1`),
greedy tokens identical and logprobs within 1e-5 of the full-length fp8 caches (fp32
compute, fp8 storage: the same arithmetic on other pages).
"""

from __future__ import annotations

import gc
import shutil

import numpy as np
import pytest

from jaxllm.checkpoints import GEMMA4_MOE, cached_checkpoint

PROMPT_LENS = (9, 23, 40, 64)   # past Llama 4's 16-token chunk and Gemma 4's 8-token window
MAX_TOKENS = 16
FP8_KV = dict(kv_cache_dtype="fp8")
INT8 = {"quantization": {"qwix": {"rules": [{"module_path": ".*", "weight_qtype": "int8"}]}}}
# tpu-inference's recipe for Gemma 4 31B on v6e (its issue 2333): fp8 weights and activations, fp8 KV.
RECIPE = {"quantization": {"qwix": {"rules": [{"module_path": ".*", "weight_qtype": "float8_e4m3fn",
                                               "act_qtype": "float8_e4m3fn"}]}}}

# (mean |Δlogprob| bound, greedy agreement bound) per run, against its reference.
# (bound on mean |Δlogprob|, bound on greedy agreement) per run, against its reference; measured values
# (this CPU, 2026-11-30) in the comments. Greedy agreement is a floor only: the bf16 run itself keeps
# 94% (Llama 4) and 97% (Gemma 4) of its own greedy tokens as top-1 when teacher-forced (prefill and
# decode round differently), and Gemma 4's logits are flat (std 0.16), so any noise reorders its top
# two; chance would be 1 in 1024.
BOUNDS = {
    ("llama4", "fp8-kv"): (0.08, 0.7),   # 0.0377, 0.859
    ("llama4", "int8"): (0.03, 0.75),    # 0.0150, 0.891
    ("gemma4", "fp8-kv"): (0.05, 0.4),   # 0.0265, 0.594
    ("gemma4", "int8"): (0.035, 0.5),    # 0.0170, 0.703
    ("gemma4", "recipe"): (0.1, 0.2),    # 0.0468, 0.344
}
MEASURED = {}  # filled by the runs: printed with -s, quoted in the README


def _prompts(seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(2, 1000, n).tolist() for n in PROMPT_LENS]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """The tiny Llama 4, and the tiny Gemma 4 (MoE) with its attention tempered (module docstring)."""
    import torch
    from safetensors.torch import load_file, save_file

    gemma = cached_checkpoint("gemma4", "tiny", enable_moe_block=True, **GEMMA4_MOE["tiny"])
    tempered = tmp_path_factory.mktemp("gemma4-tempered")
    shutil.copytree(gemma, tempered, dirs_exist_ok=True, ignore=shutil.ignore_patterns("model.safetensors"))
    tensors = load_file(gemma / "model.safetensors")
    for name in tensors:
        if name.endswith("q_norm.weight"):
            tensors[name] = tensors[name] * torch.tensor(0.25, dtype=tensors[name].dtype)
    save_file(tensors, tempered / "model.safetensors", metadata={"format": "pt"})
    return {"llama4": cached_checkpoint("llama4", "tiny"), "gemma4": tempered}


def engine_run(monkeypatch, path, sequences, *, windowed=None, poison=False, dtype="bfloat16", **engine_args):
    """(greedy continuations of the prompts, teacher-forced (logprob, rank) arrays per sequence) of one engine.

    `sequences`: what to score (prompt + a reference continuation); None: score the run's own.
    """
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    if windowed is not None:
        monkeypatch.setenv("JAXLLM_WINDOWED_KV_CACHE", "1" if windowed else "0")
    monkeypatch.setenv("JAXLLM_POISON_KV_CACHE", "1" if poison else "0")
    llm = LLM(model=str(path), max_model_len=256, max_num_seqs=8, dtype=dtype, seed=0,
              num_gpu_blocks_override=256, max_num_batched_tokens=32, **engine_args)
    try:
        prompts = _prompts()
        outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts],
                               SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True, logprobs=0),
                               use_tqdm=False)
        greedy = [list(o.outputs[0].token_ids) for o in outputs]
        greedy_logprobs = [[step[t].logprob for step, t in zip(o.outputs[0].logprobs, toks)]
                           for o, toks in zip(outputs, greedy)]
        if sequences is None:
            sequences = [p + g for p, g in zip(prompts, greedy)]
        scored = llm.generate([TokensPrompt(prompt_token_ids=s) for s in sequences],
                              SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0), use_tqdm=False)
        teacher = []
        for sequence, output in zip(sequences, scored):
            steps = output.prompt_logprobs[1:]  # position 0 has none
            teacher.append(np.array([[step[t].logprob, step[t].rank] for step, t in zip(steps, sequence[1:])]))
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
    return greedy, greedy_logprobs, sequences, teacher


def closeness(teacher, reference) -> tuple[float, float]:
    """(mean |Δlogprob| over every scored position, share of continuation positions still top-1)."""
    deltas = np.concatenate([np.abs(t[:, 0] - r[:, 0]) for t, r in zip(teacher, reference)])
    top1 = np.concatenate([t[n - 1:, 1] == 1 for t, n in zip(teacher, PROMPT_LENS)])
    assert np.isfinite(deltas).all()
    return float(deltas.mean()), float(top1.mean())


def check_close(arch, run, teacher, reference):
    mean_delta, agreement = closeness(teacher, reference)
    MEASURED[arch, run] = (round(mean_delta, 4), round(agreement, 3))
    print(f"\n{arch} {run}: mean |Δlogprob| {mean_delta:.4f}, greedy agreement {agreement:.3f}")
    max_mean, min_agreement = BOUNDS[arch, run]
    assert mean_delta <= max_mean and agreement >= min_agreement, (arch, run, mean_delta, agreement)


@pytest.fixture(scope="module")
def monkeymodule():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


@pytest.fixture(scope="module", params=["llama4", "gemma4"])
def bf16(request, checkpoints, monkeymodule):
    """The bf16 reference run: its greedy sequences and their teacher-forced logprobs."""
    arch = request.param
    _, _, sequences, teacher = engine_run(monkeymodule, checkpoints[arch], None)
    return arch, sequences, teacher


def test_int8_weights_stay_close_to_bf16(bf16, checkpoints, monkeymodule):
    arch, sequences, reference = bf16
    _, _, _, teacher = engine_run(monkeymodule, checkpoints[arch], sequences, additional_config=INT8)
    check_close(arch, "int8", teacher, reference)


def test_tpu_inference_recipe_fp8_weights_activations_and_kv_stay_close_to_bf16(bf16, checkpoints, monkeymodule):
    arch, sequences, reference = bf16
    if arch != "gemma4":
        pytest.skip("tpu-inference's fp8 recipe is Gemma 4's")
    _, _, _, teacher = engine_run(monkeymodule, checkpoints[arch], sequences, additional_config=RECIPE, **FP8_KV)
    check_close(arch, "recipe", teacher, reference)


def test_fp8_kv_cache_window_aware_equals_full_length_and_stays_close_to_bf16(bf16, checkpoints, monkeymodule):
    """bf16 weights, fp8 KV: the full-length run is close to the bf16 run; the window-aware run, every page
    NaN at start, gives the full-length run's tokens and logprobs."""
    arch, sequences, reference = bf16
    full = engine_run(monkeymodule, checkpoints[arch], sequences, windowed=False, **FP8_KV)
    check_close(arch, "fp8-kv", full[3], reference)
    windowed = engine_run(monkeymodule, checkpoints[arch], sequences, windowed=True, poison=True, **FP8_KV)
    assert windowed[0] == full[0]
    for got, expected in zip(windowed[1] + [t[:, 0] for t in windowed[3]], full[1] + [t[:, 0] for t in full[3]]):
        np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)


def test_fp8_checkpoint_matches_hf_on_its_dequantized_weights(tmp_path):
    """The tiny Llama 4 with its routed experts in Maverick FP8's format (tests/fp8_checkpoints.py), served in
    fp32: greedy tokens identical to transformers' on the checkpoint dequantized by compressed-tensors, and
    logprobs within 1e-4, as for unquantized checkpoints (tests/test_vllm_generate.py): the dequantization is
    the same arithmetic, so only summation order differs."""
    import fp8_checkpoints
    from test_vllm_generate import LOGPROB_ATOL, MAX_TOKENS as HF_TOKENS, generate, hf_greedy

    fp8_dir, reference_dir = fp8_checkpoints.build(cached_checkpoint("llama4", "tiny"), tmp_path)
    prompt_ids, tokens, logprobs = generate(fp8_dir)
    expected_tokens, expected_logprobs = hf_greedy(reference_dir, prompt_ids, HF_TOKENS)
    assert tokens == expected_tokens
    np.testing.assert_allclose(logprobs, expected_logprobs, atol=LOGPROB_ATOL, rtol=0)
