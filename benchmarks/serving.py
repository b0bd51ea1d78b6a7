"""Serving through vLLM on this host: jaxllm's models vs tpu-inference's built-in ones vs HF transformers.

    python benchmarks/serving.py [--archs llama4 gemma4] [--reps 3]

Per architecture, on the same "small" multimodal checkpoint (the built-in models load
only the multimodal layout; everyone serves its text model, see BUILTIN_ENV):
- two vLLM engines in their own processes, ours and the built-in one
  (JAXLLM_USE_BUILTIN_MODELS=1), each started with an empty XLA compile cache;
- Hugging Face transformers' `generate` (torch eager) in this process.
They take turns on every measurement (ours, built-in, HF, then again), and each
figure is the median over --reps turns, so machine load hits all of them alike.

Per batch B of P-token prompts: TTFT = time of a batch generating 1 token (the
batch's prefill), total = time generating N tokens, TPOT = (total - TTFT)/(N - 1),
output tok/s = B*N/total, prefill tok/s = B*P/TTFT.

Also printed: each decode step (TPOT) as % of the roofline of benchmarks/roofline.py
(copy bandwidth and matmul peak measured in this run), and for the engines the
start-up time and the number of XLA compilations (counted in every engine process
by benchmarks/compile_log/sitecustomize.py) during start-up, during the first
request of each shape, and after that (0 means shapes are bucketed and warm-up
compiled them all).
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, deque
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from common import fmt, machine, median, table  # noqa: E402
from roofline import DecodeCost, machine_limits  # noqa: E402
from serving_worker import RESULT_TAG, prompts  # noqa: E402

PROMPT_LEN, NEW_TOKENS, MAX_MODEL_LEN = 128, 32, 512
ENGINE_BATCHES = {"ours": (1, 8, 16, 32), "built-in": (1, 8, 32)}
HF_BATCHES = (1, 16)


class Engine:
    """A serving_worker.py process: one vLLM engine, commands in, JSON results out."""

    def __init__(self, name: str, model: str, env: dict[str, str], workdir: Path):
        self.name, self.error, self.ready_seconds = name, None, float("nan")
        self.compile_log = workdir / f"{name}-compiles.log"
        self.log_path = workdir / f"{name}.log"
        env = {**os.environ, **env,
               "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE / "compile_log"), os.environ.get("PYTHONPATH")])),
               "JAXLLM_BENCH_COMPILE_LOG": str(self.compile_log),
               "VLLM_XLA_CACHE_PATH": str(workdir / f"{name}-xla-cache")}  # a cold start, whatever ran before
        self.process = subprocess.Popen(
            [sys.executable, str(HERE / "serving_worker.py"), model, str(MAX_MODEL_LEN), str(max(ENGINE_BATCHES["ours"]))],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
            start_new_session=True)
        self.results: queue.Queue = queue.Queue()
        self.tail: deque[str] = deque(maxlen=40)
        threading.Thread(target=self._read, daemon=True).start()
        ready = self._result(timeout=900)
        if ready is not None:
            self.ready_seconds = ready["ready"]

    def _read(self) -> None:
        with open(self.log_path, "w") as log:
            for line in self.process.stdout:
                if line.startswith(RESULT_TAG):
                    self.results.put(json.loads(line[len(RESULT_TAG):]))
                else:
                    log.write(line)
                    self.tail.append(line.rstrip())
        self.results.put({"error": "worker exited"})

    def _result(self, timeout: float):
        try:
            result = self.results.get(timeout=timeout)
        except queue.Empty:
            result = {"error": f"no answer in {timeout:.0f} s"}
        if "error" in result:
            self.error = self.error or self._root_cause() or result["error"]
            print(f"  {self.name}: FAILED: {self.error} (log: {self.log_path})", flush=True)
            self.close()
            return None
        return result

    def _root_cause(self) -> str | None:
        """The engine core's own exception line from the log (the front end only says the core failed)."""
        time.sleep(1)  # let the reader thread drain the last lines
        found = None
        if self.log_path.exists():
            for line in self.log_path.read_text().splitlines():
                match = re.search(r"\] ((?:\w+\.)*\w+(?:Error|Exception): .*)", line)
                if match:
                    found = match.group(1)[:300]
        return found

    def generate(self, batch: int, max_tokens: int):
        """(seconds, token ids per request), or None once the engine has failed."""
        if self.error:
            return None
        self.process.stdin.write(json.dumps({"batch": batch, "prompt_len": PROMPT_LEN, "max_tokens": max_tokens}) + "\n")
        self.process.stdin.flush()
        result = self._result(timeout=600)
        return None if result is None else (result["seconds"], result["tokens"])

    def compiles(self) -> list[str]:
        """Functions of the XLA compilations logged so far by the engine's processes, in order
        (the listener writes before the step returns)."""
        if not self.compile_log.exists():
            return []
        return [line.split()[4] for line in self.compile_log.read_text().splitlines() if line.split()[2] == "compile"]

    def close(self) -> None:
        if self.process.poll() is None:
            try:
                self.process.stdin.write(json.dumps({"quit": True}) + "\n")
                self.process.stdin.close()
                self.process.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                pass
        # The worker's own session: its engine core outlives it otherwise (orphaned, holding its RAM).
        try:
            os.killpg(self.process.pid, 9)
        except ProcessLookupError:
            pass


class HFModel:
    """transformers' generate, torch eager, fp32, greedy."""

    def __init__(self, checkpoint: str):
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

        self.torch = torch
        config = AutoConfig.from_pretrained(checkpoint)
        auto = AutoModelForImageTextToText if hasattr(config, "vision_config") else AutoModelForCausalLM
        self.model = auto.from_pretrained(checkpoint, dtype=torch.float32).eval()
        self.name, self.error = "HF", None

    def compiles(self) -> list[str]:
        return []

    def generate(self, batch: int, max_tokens: int):
        torch = self.torch
        ids = torch.tensor([p["prompt_token_ids"] for p in prompts(batch, PROMPT_LEN)])
        with torch.inference_mode():
            start = time.perf_counter()
            out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                      max_new_tokens=max_tokens, min_new_tokens=max_tokens, pad_token_id=0)
            seconds = time.perf_counter() - start
        return seconds, out[:, PROMPT_LEN:].tolist()


def measure(runners: dict, batches: dict, reps: int) -> dict:
    """{(runner, batch): {"ttft": [...], "total": [...], "tokens": first request's greedy tokens}}, taking turns.

    Also {runner: {"warm-up": XLA compiles in the first turn of each shape, "timed": in the others}}.
    """
    results: dict = {}
    compiles = {name: {"warm-up": [], "timed": []} for name in runners}
    shapes = sorted({b for bs in batches.values() for b in bs})
    for batch in shapes:
        for rep in range(reps + 1):  # turn 0 is a warm-up (first request of this shape), not recorded
            for name, runner in runners.items():
                if batch not in batches[name] or runner.error:
                    continue
                before = len(runner.compiles())
                first = runner.generate(batch, 1)
                full = runner.generate(batch, NEW_TOKENS) if first else None
                compiles[name]["timed" if rep else "warm-up"] += runner.compiles()[before:]
                if not full:
                    continue
                entry = results.setdefault((name, batch), {"ttft": [], "total": [], "tokens": full[1][0]})
                if rep:
                    entry["ttft"].append(first[0])
                    entry["total"].append(full[0])
            if rep == 0:
                print(f"  batch {batch}: warm", flush=True)
    return results, compiles


def same_prefix(a, b) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


# tpu-inference's built-in models, served from the same checkpoints. Their multimodal classes don't
# start on CPU (Llama 4's maps to LlamaGuard4ForCausalLM, which ignores intermediate_size_mlp; Gemma 4's
# wants vision_config.default_output_length), so the text classes are selected (serving_worker.py
# passes JAXLLM_BENCH_ARCHITECTURE as --hf-overrides). Built-in Llama 4 also needs tpu-inference's
# NEW_MODEL_DESIGN mesh (it shards over an "expert" axis).
# Its warm-up compiles 359 shapes in about 500 s here; skipped (SKIP_JAX_PRECOMPILE=1) so that make bench
# stays in its time budget: its start-up is then not comparable, and the untimed warm-up turns compile it.
BUILTIN_ENV = {
    "llama4": {"JAXLLM_USE_BUILTIN_MODELS": "1", "JAXLLM_BENCH_ARCHITECTURE": "Llama4ForCausalLM",
               "NEW_MODEL_DESIGN": "1", "SKIP_JAX_PRECOMPILE": "1"},
    "gemma4": {"JAXLLM_USE_BUILTIN_MODELS": "1", "JAXLLM_BENCH_ARCHITECTURE": "Gemma4ForCausalLM",
               "SKIP_JAX_PRECOMPILE": "1"},
}


def run_arch(arch: str, reps: int, limits: dict, workdir: Path) -> list[str]:
    from jaxllm.checkpoints import cached_checkpoint

    checkpoint = str(cached_checkpoint(arch, "small", multimodal=True))
    print(f"\n## {arch} small ({checkpoint})", flush=True)
    engines = {}
    for name, env in (("ours", {"JAXLLM_USE_BUILTIN_MODELS": "0"}), ("built-in", BUILTIN_ENV[arch])):
        start = time.time()
        engines[name] = Engine(f"{arch}-{name}", checkpoint, env, workdir)  # one at a time: start-up is timed
        print(f"  {name}: engine {'failed' if engines[name].error else 'ready'} after {time.time() - start:.0f} s",
              flush=True)
    hf = HFModel(checkpoint)
    runners = {"ours": engines["ours"], "built-in": engines["built-in"], "HF": hf}
    batches = {**ENGINE_BATCHES, "HF": HF_BATCHES}
    start_compiles = {name: len(engine.compiles()) for name, engine in engines.items()}
    results, compiles = measure(runners, batches, reps)
    for engine in engines.values():
        engine.close()

    out = [f"### {arch}: vLLM serving, {PROMPT_LEN}-token prompts, {NEW_TOKENS} new tokens, fp32, "
           f"median of {reps} turns ({machine()})", ""]
    rows = []
    for batch in sorted({b for bs in batches.values() for b in bs}):
        ref = results.get(("ours", batch))
        for name in runners:
            r = results.get((name, batch))
            if batch not in batches[name]:
                continue
            if not r or not r["ttft"]:
                rows.append([name, batch, f"failed: {runners[name].error}", "", "", "", "", ""])
                continue
            ttft, total = median(r["ttft"]), median(r["total"])
            tpot = (total - ttft) / (NEW_TOKENS - 1)
            speedup = "" if name == "ours" or not ref or not ref["ttft"] else \
                f"{median(r['total']) / median(ref['total']):.2f}x"
            rows.append([name, batch, fmt(batch * NEW_TOKENS / total), fmt(batch * PROMPT_LEN / ttft),
                         fmt(ttft * 1e3), fmt(tpot * 1e3), speedup,
                         f"{same_prefix(r['tokens'], results[('HF', 1)]['tokens'])}/{NEW_TOKENS}"
                         if ("HF", 1) in results and batch == 1 else ""])
    out.append(table(["model", "batch", "output tok/s", "prefill tok/s", "TTFT ms", "TPOT ms",
                      "ours faster by (total time)", "greedy = HF"], rows))

    cost = DecodeCost(checkpoint)
    context = PROMPT_LEN + NEW_TOKENS // 2
    out += ["", f"### {arch}: decode step vs roofline (copy {limits['bandwidth'] / 1e9:.1f} GB/s, fp32 matmul "
                f"{limits['peak'] / 1e9:.0f} GFLOP/s, context {context})", ""]
    rows = []
    for batch in HF_BATCHES:
        bound = cost.step_seconds(limits, batch, context)
        for name in ("ours", "HF"):
            r = results.get((name, batch))
            if not r or not r["ttft"]:
                continue
            tpot = (median(r["total"]) - median(r["ttft"])) / (NEW_TOKENS - 1)
            rows.append([name, batch, fmt((cost.weight_bytes(batch) + cost.kv_bytes(batch, context)) / 1e6),
                         fmt(bound * 1e3), fmt(tpot * 1e3), f"{100 * bound / tpot:.0f}%"])
    out.append(table(["model", "batch", "MB read / step", "roofline ms", "step ms", "% of roofline"], rows))

    out += ["", f"### {arch}: engine start-up (empty XLA cache) and XLA compilations", ""]
    rows = []
    for name, engine in engines.items():
        if engine.ready_seconds != engine.ready_seconds:
            rows.append([name, f"failed: {engine.error}", "", "", ""])
            continue
        rows.append([name, f"{engine.ready_seconds:.1f}", start_compiles[name], len(compiles[name]["warm-up"]),
                     len(compiles[name]["timed"])])
    out.append(table(["model", "start-up s", "compiles in start-up", "compiles in warm-up turns",
                      "compiles after warm-up"], rows))
    for name in engines:
        for phase in ("warm-up", "timed"):
            if compiles[name][phase]:
                counted = Counter(compiles[name][phase]).most_common()
                out.append(f"\n{name}, compiled in {phase} turns: " + ", ".join(f"{f} x{n}" for f, n in counted))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archs", nargs="+", default=["llama4", "gemma4"], choices=["llama4", "gemma4"])
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args()
    limits = machine_limits()  # measured here, before any engine runs, and applied to every table
    print(f"machine: {machine()}; copy {limits['bandwidth'] / 1e9:.1f} GB/s, fp32 matmul "
          f"{limits['peak_xla'] / 1e9:.0f} GFLOP/s (XLA) / {limits['peak_torch'] / 1e9:.0f} (torch)", flush=True)
    # Engine logs stay (failures point at them); the compile caches go.
    workdir = Path(tempfile.mkdtemp(prefix="jaxllm-bench-serving-"))
    report = []
    for arch in args.archs:
        report += ["", *run_arch(arch, args.reps, limits, workdir)]
        for cache in workdir.glob("*-xla-cache"):
            shutil.rmtree(cache, ignore_errors=True)
    print("\n".join(report))


if __name__ == "__main__":
    main()
