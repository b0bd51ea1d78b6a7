"""Offline batch generation with vLLM and the jaxllm plugin.

    python examples/offline_batch.py                          # tiny local Llama 4 and Gemma 4 checkpoints
    python examples/offline_batch.py --model /path/to/checkpoint --prompts prompts.txt --max-tokens 128
    python examples/offline_batch.py --model meta-llama/Llama-4-Scout-17B-16E-Instruct \\
        --tensor-parallel-size 8 --max-model-len 8192 --num-prompts 256 --ignore-eos

Without `--model` it builds a random-weight checkpoint per `--arch` with
`jaxllm.checkpoints` (no hub access needed), so the text is gibberish: the point is
the plumbing and the speed. Every `vllm serve` engine flag works here too
(`--hf-overrides`, `--limit-mm-per-prompt`, `--num-gpu-blocks-override`, ...).
Off TPU, set JAX_PLATFORMS=cpu (`make demo` does).
"""

from __future__ import annotations

import argparse
import sys
import time

DEFAULT_PROMPTS = [
    "The capital of France is",
    "Once upon a time, there was a",
    "The quick brown fox",
    "In machine learning, attention is",
    "def fibonacci(n):",
    "Hello, my name is",
]

# Our defaults where they differ from vLLM's. A short context keeps the KV cache and
# the warm-up compilation small; a real deployment sets its own.
ENGINE_DEFAULTS = dict(model=None, max_model_len=1024, max_num_seqs=16, gpu_memory_utilization=None)
SAMPLING_FLAGS = ("max_tokens", "min_tokens", "ignore_eos", "temperature", "top_p", "top_k")
EXAMPLE_FLAGS = ("arch", "size", "prompts", "num_prompts", "show") + SAMPLING_FLAGS


def make_parser():
    # vLLM's own parser (slow to import, ~10 s) so that every engine flag is accepted.
    from vllm.engine.arg_utils import EngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    p = FlexibleArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    example = p.add_argument_group("example")
    example.add_argument("--arch", nargs="+", default=["llama4", "gemma4"], choices=["llama", "llama4", "gemma4"],
                         help="architectures of the locally built checkpoints (ignored with --model); "
                              "llama is plain Llama 3, served by tpu-inference's built-in model")
    example.add_argument("--size", default="tiny", choices=["tiny", "small"], help="size of the local checkpoints")
    example.add_argument("--prompts", help="text file, one prompt per line ('-': stdin); default: built-in prompts")
    example.add_argument("--num-prompts", type=int, help="cycle through the prompts until there are this many")
    example.add_argument("--show", type=int, default=8, help="print the first N completions")
    sampling = p.add_argument_group("sampling")
    sampling.add_argument("--max-tokens", type=int, default=32)
    sampling.add_argument("--min-tokens", type=int, default=0)
    sampling.add_argument("--ignore-eos", action="store_true",
                          help="always generate --max-tokens tokens (for throughput measurements)")
    sampling.add_argument("--temperature", type=float, default=0.0)
    sampling.add_argument("--top-p", type=float, default=1.0)
    sampling.add_argument("--top-k", type=int, default=-1)
    EngineArgs.add_cli_args(p)
    p.set_defaults(**ENGINE_DEFAULTS)
    return p


def engine_kwargs(args, parser) -> dict:
    """The engine flags given on the command line or defaulted by us; vLLM's defaults for the rest."""
    kwargs = {k: v for k, v in vars(args).items()
              if k not in EXAMPLE_FLAGS and (k in ENGINE_DEFAULTS or v != parser.get_default(k))}
    if kwargs["gpu_memory_utilization"] is None:
        from jaxllm.platform import on_tpu

        if on_tpu():
            del kwargs["gpu_memory_utilization"]  # vLLM's default
        else:
            # Off TPU the "device memory" is RAM, shared with everything else, and the
            # KV cache is allocated up front.
            kwargs["gpu_memory_utilization"] = 0.1
    return kwargs


def read_prompts(args) -> list[str]:
    prompts = DEFAULT_PROMPTS
    if args.prompts:
        f = sys.stdin if args.prompts == "-" else open(args.prompts)
        with f:
            prompts = [line.rstrip("\n") for line in f if line.strip()]
        if not prompts:
            sys.exit(f"no prompts in {args.prompts}")
    if args.num_prompts:
        prompts = [prompts[i % len(prompts)] for i in range(args.num_prompts)]
    return prompts


def run(engine: dict, prompts: list[str], args) -> None:
    from vllm import LLM, SamplingParams

    start = time.perf_counter()
    llm = LLM(**engine)
    print(f"engine ready in {time.perf_counter() - start:.1f} s", flush=True)

    sampling = SamplingParams(max_tokens=args.max_tokens, min_tokens=args.min_tokens, ignore_eos=args.ignore_eos,
                              temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed)
    start = time.perf_counter()
    outputs = llm.generate(prompts, sampling)  # vLLM's progress bar shows requests done and tokens/s
    elapsed = time.perf_counter() - start

    print(f"\n=== {engine['model']}")
    for o in outputs[:args.show]:
        print(f"--- {o.prompt!r} ({len(o.outputs[0].token_ids)} tokens)\n{o.outputs[0].text!r}")
    if len(outputs) > args.show:
        print(f"--- ... {len(outputs) - args.show} more")
    generated = sum(len(o.outputs[0].token_ids) for o in outputs)
    prompt_tokens = sum(len(o.prompt_token_ids) for o in outputs)
    print(f"\n{len(outputs)} requests in {elapsed:.2f} s: {prompt_tokens} prompt tokens "
          f"({prompt_tokens / elapsed:.1f}/s), {generated} generated tokens ({generated / elapsed:.1f}/s), "
          f"{len(outputs) / elapsed:.2f} requests/s", flush=True)
    del llm


def main() -> None:
    parser = make_parser()
    args = parser.parse_args()
    prompts = read_prompts(args)
    engine = engine_kwargs(args, parser)
    if args.model:
        run(engine, prompts, args)
        return
    from jaxllm.checkpoints import cached_checkpoint

    for arch in args.arch:
        run({**engine, "model": str(cached_checkpoint(arch, args.size))}, prompts, args)


if __name__ == "__main__":
    main()
