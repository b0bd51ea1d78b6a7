"""Offline batch generation with vLLM and the jaxllm plugin.

    python examples/offline_batch.py                       # small local checkpoint(s), built on first use
    python examples/offline_batch.py --model /path/to/ckpt --prompts prompts.txt --max-tokens 128

Without `--model` it builds a random-weight checkpoint per `--arch` with
`jaxllm.checkpoints` (no hub access needed), so the text is gibberish: the point
is the plumbing and the speed. Off TPU, set JAX_PLATFORMS=cpu (`make demo` does).
"""

from __future__ import annotations

import argparse
import time

DEFAULT_PROMPTS = [
    "The capital of France is",
    "Once upon a time, there was a",
    "The quick brown fox",
    "In machine learning, attention is",
    "def fibonacci(n):",
    "Hello, my name is",
]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="checkpoint folder or hub name; default: a locally built small checkpoint")
    p.add_argument("--arch", nargs="+", default=["llama4", "gemma4"], choices=["llama", "llama4", "gemma4"],
                   help="architectures of the locally built checkpoints (ignored with --model); "
                        "llama is plain Llama 3, served by tpu-inference's built-in model")
    p.add_argument("--size", default="tiny", choices=["tiny", "small"], help="size of the local checkpoints")
    p.add_argument("--prompts", help="text file, one prompt per line; default: built-in prompts")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=-1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--max-num-seqs", type=int, default=16)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument("--gpu-memory-utilization", type=float, default=None,
                   help="share of device memory for weights + KV cache; off TPU the device memory is RAM, "
                        "and the default there is 0.1 rather than vLLM's 0.9")
    p.add_argument("--num-gpu-blocks-override", type=int, default=None, help="fix the number of KV-cache blocks")
    return p.parse_args()


def run(model: str, prompts: list[str], args: argparse.Namespace) -> None:
    from vllm import LLM, SamplingParams

    engine_args = dict(model=model, max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
                       dtype=args.dtype, tensor_parallel_size=args.tensor_parallel_size, seed=args.seed)
    from jaxllm.vllm_plugin.host import tpu_present

    utilization = args.gpu_memory_utilization
    if utilization is None and not tpu_present():
        utilization = 0.1  # the KV cache is allocated up front, in RAM shared with everything else
    if utilization is not None:
        engine_args["gpu_memory_utilization"] = utilization
    if args.num_gpu_blocks_override is not None:
        engine_args["num_gpu_blocks_override"] = args.num_gpu_blocks_override
    start = time.perf_counter()
    llm = LLM(**engine_args)
    print(f"engine ready in {time.perf_counter() - start:.1f} s")

    sampling = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                              top_k=args.top_k, seed=args.seed)
    start = time.perf_counter()
    outputs = llm.generate(prompts, sampling)
    elapsed = time.perf_counter() - start

    generated = sum(len(o.outputs[0].token_ids) for o in outputs)
    prompt_tokens = sum(len(o.prompt_token_ids) for o in outputs)
    print(f"\n=== {model}")
    for o in outputs:
        print(f"--- {o.prompt!r}\n{o.outputs[0].text!r}")
    print(f"\n{len(outputs)} requests, {prompt_tokens} prompt + {generated} generated tokens in {elapsed:.2f} s: "
          f"{generated / elapsed:.1f} generated tokens/s")
    del llm


def main() -> None:
    args = parse_args()
    prompts = DEFAULT_PROMPTS
    if args.prompts:
        with open(args.prompts) as f:
            prompts = [line.rstrip("\n") for line in f if line.strip()]
    if args.model:
        run(args.model, prompts, args)
        return
    from jaxllm.checkpoints import cached_checkpoint

    for arch in args.arch:
        run(str(cached_checkpoint(arch, args.size)), prompts, args)


if __name__ == "__main__":
    main()
