"""One vLLM engine, driven by benchmarks/serving.py over stdin/stdout (one JSON object a line).

    python benchmarks/serving_worker.py MODEL_DIR MAX_MODEL_LEN MAX_NUM_SEQS

Which implementation serves the model is decided by the environment the driver
gives it (JAXLLM_USE_BUILTIN_MODELS). Commands:
    {"batch": B, "prompt_len": P, "max_tokens": N}  -> {"seconds": s, "tokens": [[...] per request]}
    {"quit": true}
Results go out on lines starting with RESULT_TAG, so vLLM's own log lines on stdout
can be skipped. A failure is reported as {"error": "<first line>"} and the worker exits.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback

RESULT_TAG = "@@bench "


def reply(obj) -> None:
    sys.stdout.write(RESULT_TAG + json.dumps(obj) + "\n")
    sys.stdout.flush()


def prompts(batch: int, prompt_len: int):
    """Fixed token ids, different per request (no prefix caching across them); ids avoid the special tokens."""
    return [{"prompt_token_ids": [100 + (r * 37 + i * 11) % 3000 for i in range(prompt_len)]}
            for r in range(batch)]


def first_error_line(exc: BaseException) -> str:
    # The root cause, not vLLM's "engine core failed" wrapper, when there is one.
    while exc.__cause__ is not None:
        exc = exc.__cause__
    text = f"{type(exc).__name__}: {exc}".strip()
    return text.splitlines()[0][:300]


def main() -> None:
    model, max_model_len, max_num_seqs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    try:
        from vllm import LLM, SamplingParams

        start = time.perf_counter()
        architecture = os.environ.get("JAXLLM_BENCH_ARCHITECTURE")
        overrides = {"hf_overrides": {"architectures": [architecture]}} if architecture else {}
        llm = LLM(model=model, max_model_len=max_model_len, max_num_seqs=max_num_seqs, dtype="float32",
                  gpu_memory_utilization=0.1, enable_prefix_caching=False, seed=0,
                  limit_mm_per_prompt={"image": 0, "video": 0}, **overrides)
        reply({"ready": time.perf_counter() - start, "ready_at": time.time()})
    except BaseException as exc:  # noqa: BLE001 -- reported to the driver, which records it
        traceback.print_exc()
        reply({"error": first_error_line(exc)})
        return
    for line in sys.stdin:
        command = json.loads(line)
        if command.get("quit"):
            break
        sampling = SamplingParams(max_tokens=command["max_tokens"], min_tokens=command["max_tokens"],
                                  temperature=0.0, ignore_eos=True)
        batch = prompts(command["batch"], command["prompt_len"])
        try:
            start = time.perf_counter()
            outputs = llm.generate(batch, sampling, use_tqdm=False)
            seconds = time.perf_counter() - start
        except BaseException as exc:  # noqa: BLE001
            traceback.print_exc()
            reply({"error": first_error_line(exc)})
            return
        reply({"seconds": seconds, "tokens": [list(o.outputs[0].token_ids) for o in outputs]})
    os._exit(0)  # skip vLLM's slow shutdown; the driver kills the engine core with this session


if __name__ == "__main__":
    main()
