"""Image requests through vLLM: jaxllm's Gemma 4 vs tpu-inference's built-in, same checkpoint, same run.

    python benchmarks/serving_images.py [--requests 16] [--reps 2] [--size small]

The small multimodal Gemma 4 checkpoint (processor files, vision tower; head dims 128 and 256,
which the built-in model needs: it fails to load the tiny one's 32 / 64), its vision position
table padded to the released 10,240 rows (the built-in hard-codes them), fp32, a batch of
chats each with one image (different images), greedy, 16 new tokens. For each model:
image requests per second over the whole batch, time to first token (the batch with one
new token: its prefill, encoder included), and how many requests' greedy tokens equal Hugging Face's
`generate` on the same chat. Each model runs in its own engine; the engines take turns.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("SKIP_JAX_PRECOMPILE", "1")
os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")  # HF's torch runs in this process too

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from common import fmt, machine, median, table  # noqa: E402

MAX_TOKENS = 16


def chats(n: int):
    from multimodal_inputs import chat, images

    return [chat(1, "Describe the image.", pictures=images(1, seed=100 + i)) for i in range(n)]


def run_engine(path, builtin: bool, prompts, reps: int) -> dict:
    from vllm import LLM, SamplingParams

    os.environ["JAXLLM_USE_BUILTIN_MODELS"] = "1" if builtin else "0"
    try:
        llm = LLM(model=str(path), max_model_len=512, max_num_seqs=len(prompts), dtype="float32", seed=0,
                  gpu_memory_utilization=0.05)
    except Exception as error:  # noqa: BLE001 - a start-up failure is a result here
        return {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"}
    try:
        params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
        first = SamplingParams(max_tokens=1, temperature=0)
        llm.generate(prompts, params, use_tqdm=False)  # compiles
        walls, ttfts, outputs = [], [], None
        for _ in range(reps):
            start = time.perf_counter()
            llm.generate(prompts, first, use_tqdm=False)
            ttfts.append(time.perf_counter() - start)
            start = time.perf_counter()
            outputs = llm.generate(prompts, params, use_tqdm=False)
            walls.append(time.perf_counter() - start)
        return {"wall": median(walls), "ttft": median(ttfts),
                "tokens": [list(o.outputs[0].token_ids) for o in outputs]}
    except Exception as error:  # noqa: BLE001 - so is a failure at the first image (the cause is in the log)
        return {"error": f"fails serving: {type(error).__name__}"}
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()


def with_released_position_table(path: Path, rows: int = 10240) -> Path:
    """A copy of the checkpoint whose vision position table has the released checkpoints' `rows`.

    tpu-inference's built-in Gemma 4 builds the table at that size whatever the config says. The
    rows added are zeros at positions no test image reaches (they stay below the original size), so
    every model, HF included, computes exactly what it did on the original.
    """
    import json
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    out = path.with_name(f"{path.name}-positions{rows}")
    if (out / "config.json").exists():
        return out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(path, tmp)
    for file in tmp.glob("*.safetensors"):
        tensors = load_file(file)
        for name, tensor in tensors.items():
            if name.endswith("patch_embedder.position_embedding_table"):  # [2, positions, hidden]
                padded = torch.zeros(tensor.shape[0], rows, tensor.shape[2], dtype=tensor.dtype)
                padded[:, :tensor.shape[1]] = tensor
                tensors[name] = padded
        save_file(tensors, file, metadata={"format": "pt"})
    config = json.loads((tmp / "config.json").read_text())
    config["vision_config"]["position_embedding_size"] = rows
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    tmp.rename(out)
    return out


def hf_tokens(path, conversations) -> list[list[int]]:
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(str(path), dtype=torch.float32).eval()
    out = []
    for messages in conversations:
        inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                               return_dict=True, return_tensors="pt")
        with torch.no_grad():
            sequence = model.generate(**inputs, max_new_tokens=MAX_TOKENS, min_new_tokens=MAX_TOKENS,
                                      do_sample=False)
        out.append(sequence[0, inputs["input_ids"].shape[1]:].tolist())
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--size", default="small", choices=["tiny", "small"])
    args = p.parse_args()
    from transformers import AutoTokenizer

    from jaxllm.checkpoints import cached_checkpoint
    from test_vllm_multimodal import vllm_prompt

    path = with_released_position_table(cached_checkpoint("gemma4", args.size, multimodal=True))
    conversations = chats(args.requests)
    tokenizer = AutoTokenizer.from_pretrained(path)
    prompts = [vllm_prompt(tokenizer, messages) for messages in conversations]
    results = {"jaxllm": run_engine(path, False, prompts, args.reps),
               "built-in": run_engine(path, True, prompts, args.reps)}
    reference = hf_tokens(path, conversations)
    rows = []
    for name, r in results.items():
        if "error" in r:
            rows.append([name, "fails", "", "", r["error"]])
            continue
        exact = sum(t == h for t, h in zip(r["tokens"], reference))
        rows.append([name, fmt(args.requests / r["wall"]), fmt(r["ttft"] * 1e3), f"{exact}/{args.requests}", ""])
    ours, builtin = results["jaxllm"], results["built-in"]
    ratio = ("" if "error" in ours or "error" in builtin else f" ours / built-in: {builtin['wall'] / ours['wall']:.2f}×")
    print(f"\n### Image requests through vLLM: {args.requests} chats with one image each, {MAX_TOKENS} new tokens, "
          f"{args.size} Gemma 4 multimodal, fp32 (median of {args.reps}; {machine()}){ratio}\n")
    print(table(["model", "image requests/s", "TTFT ms (batch)", "greedy = HF", "note"], rows))


if __name__ == "__main__":
    main()
