"""Query a `vllm serve` endpoint (examples/serve.sh, `make serve`) with the `openai` client.

    python examples/client.py                                   # http://127.0.0.1:8000/v1, the served model
    python examples/client.py --base-url http://tpu-vm:8000/v1 --prompt "Tell me about TPUs" --max-tokens 64

Runs the four kinds of request a chat application makes -- completion and chat
completion, each whole and streamed -- and prints each answer with its token count
and time. Exits non-zero if any request fails.
"""

from __future__ import annotations

import argparse
import time

import openai


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    p.add_argument("--api-key", default="EMPTY", help="what `vllm serve --api-key` was given, if anything")
    p.add_argument("--model", help="default: the first model the server lists")
    p.add_argument("--prompt", default="The capital of France is")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--ignore-eos", action="store_true",
                   help="vLLM extension: always generate --max-tokens tokens")
    return p.parse_args()


def report(kind: str, text: str, tokens: int, seconds: float) -> None:
    print(f"--- {kind}\n{text}\n({tokens} tokens in {seconds:.2f} s)", flush=True)


def stream(kind: str, chunks, text_of) -> None:
    """Print a streamed answer as it arrives; the last chunk carries the usage (include_usage)."""
    start, usage = time.perf_counter(), None
    print(f"--- {kind}", flush=True)
    for chunk in chunks:
        if chunk.choices:
            print(text_of(chunk.choices[0]), end="", flush=True)
        usage = chunk.usage or usage
    print(f"\n({usage.completion_tokens} tokens in {time.perf_counter() - start:.2f} s)", flush=True)


def main() -> None:
    args = parse_args()
    client = openai.OpenAI(base_url=args.base_url, api_key=args.api_key)
    model = args.model or client.models.list().data[0].id
    print(f"model {model} at {args.base_url}")
    common = dict(model=model, max_tokens=args.max_tokens, temperature=args.temperature,
                  extra_body={"ignore_eos": True} if args.ignore_eos else None)
    messages = [{"role": "user", "content": args.prompt}]

    start = time.perf_counter()
    r = client.completions.create(prompt=args.prompt, **common)
    report("completion", r.choices[0].text, r.usage.completion_tokens, time.perf_counter() - start)

    start = time.perf_counter()
    r = client.chat.completions.create(messages=messages, **common)
    report("chat", r.choices[0].message.content, r.usage.completion_tokens, time.perf_counter() - start)

    stream("streamed completion",
           client.completions.create(prompt=args.prompt, stream=True, stream_options={"include_usage": True},
                                     **common),
           lambda choice: choice.text)
    stream("streamed chat",
           client.chat.completions.create(messages=messages, stream=True, stream_options={"include_usage": True},
                                          **common),
           lambda choice: choice.delta.content or "")


if __name__ == "__main__":
    main()
