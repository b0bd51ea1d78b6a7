"""Where a batch-1 decode step's time goes in vLLM's engine core: py-spy on its main thread, CPU time of its threads.

    python benchmarks/step_profile.py [--archs llama4 gemma4] [--tokens 300]

One engine at a time (benchmarks/serving_worker.py, the settings of serving.py): jaxllm's
model for each architecture, and tpu-inference's built-in Gemma 4 on the same runner (its
built-in Llama 4 does not start, see serving.py). Each is warmed up at batch 1, then one
request decodes `--tokens` tokens while
- py-spy samples the engine core's main thread, idle included, so its samples are shares of
  wall-clock time, sorted into what the thread was doing (CATEGORIES);
- /proc gives the CPU time of each of the engine core's threads over the request: its main
  thread (scheduler, runner, sampler: Python), XLA's threads (the model step, the sampler's and
  the runner's small jitted functions: the "device" of this host), the rest (vLLM's I/O threads).
Both are divided by the request's decode steps. TPOT is that request's (total - TTFT) / (tokens - 1).

"model step alone" is the same model's jitted step outside vLLM (benchmarks/model_driver.py) at
the shapes the runner gives it at batch 1 (its token and request buckets), median of 20.
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from common import fmt, machine, median, table  # noqa: E402
from serving import BUILTIN_ENV, Engine  # noqa: E402

# The main thread's stack, sorted by the first category whose marker it contains, checked in this order.
CATEGORIES = (
    ("waiting for the device", ("ArrayImpl._value", "block_until_ready", "_device_get", "ArrayImpl.__array__")),
    ("idle", ("_process_input_queue",)),
    ("runner: model call", ("wrapped_model_fn",)),
    ("runner: logits, sampling", ("_sample_from_logits", "compute_logits", "sample_tokens")),
    ("runner: inputs", ("execute_model",)),  # _prepare_inputs, _update_states, device puts, metadata
    ("scheduler", ("Scheduler.", "AsyncScheduler.")),
    ("engine core", ("run_busy_loop",)),  # outputs, queues, the loop itself
)
SHOWN = ("waiting for the device", "runner: inputs", "runner: model call", "runner: logits, sampling", "scheduler",
         "engine core")


def py_spy() -> str | None:
    found = shutil.which("py-spy") or Path(sys.executable).with_name("py-spy")
    return str(found) if found and Path(found).exists() else None


def main_thread_shares(raw: Path) -> dict[str, float]:
    """py-spy's raw output (`thread;frame;...;frame count`) -> share of the main thread's samples per category."""
    counts: collections.Counter = collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if "MainThread" not in stack.split(";", 1)[0]:
            continue
        name = next((name for name, markers in CATEGORIES if any(m in stack for m in markers)), "other")
        counts[name] += int(n)
    total = sum(counts.values()) or 1
    return {name: n / total for name, n in counts.items()}


def thread_cpu_seconds(pid: int) -> dict[tuple[int, str], float]:
    """(tid, name) -> user + system CPU seconds of each thread of `pid`."""
    out = {}
    tick = os.sysconf("SC_CLK_TCK")
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except OSError:
            continue
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2:].split()
        out[(int(task.name), name)] = (int(fields[11]) + int(fields[12])) / tick
    return out


def engine_core_pid(engine: Engine) -> int:
    import psutil

    for child in psutil.Process(engine.process.pid).children(recursive=True):
        if "EngineCore" in child.name() or "EngineCore" in " ".join(child.cmdline()):
            return child.pid
    raise RuntimeError("no EngineCore process under the serving worker")


def profile(name: str, checkpoint: str, env: dict, tokens: int, workdir: Path, spy: str | None) -> dict:
    engine = Engine(name, checkpoint, env, workdir)
    try:
        if engine.error:
            return {"error": engine.error}
        for n in (1, 32, 32):  # warm: batch-1 prefill and decode shapes
            engine.generate(1, n)
        ttft = median(engine.generate(1, 1)[0] for _ in range(3))
        pid = engine_core_pid(engine)
        raw = workdir / f"{name}.pyspy"
        before = thread_cpu_seconds(pid)
        started = time.perf_counter()
        spying = None
        if spy:
            # Starts after the prefill (py-spy takes a moment to attach); samples 4 s of decode.
            spying = subprocess.Popen([spy, "record", "--pid", str(pid), "--duration", "4", "--rate", "100",
                                       "--format", "raw", "--idle", "--threads", "--output", str(raw)],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        seconds, _ = engine.generate(1, tokens)
        after = thread_cpu_seconds(pid)
        if spying:
            spying.wait(timeout=120)
        if engine.error:
            return {"error": engine.error}
        steps = tokens - 1
        cpu: collections.Counter = collections.Counter()
        for (tid, thread), spent in after.items():
            group = "main" if tid == pid else "XLA" if thread.startswith(("tf_", "XLA")) else "other"
            cpu[group] += spent - before.get((tid, thread), 0.0)
        result = {"tpot": (seconds - ttft) / steps, "cpu": {k: v / steps for k, v in cpu.items()},
                  "wall_seconds": time.perf_counter() - started}
        if spy and raw.exists():
            result["shares"] = main_thread_shares(raw)
        return result
    finally:
        engine.close()


def model_step_alone(checkpoint: str, reps: int = 20) -> float:
    """Median seconds of the model's jitted step at the runner's batch-1 shapes (its token / request buckets)."""
    from model_driver import Stepper, build_model

    from jaxllm import vllm_plugin
    from jaxllm.vllm_plugin import patching

    vllm_plugin.register()
    from tpu_inference.runner import tpu_runner, utils as runner_utils  # noqa: F401  (applies the patches)

    small_buckets = any(p.target.endswith("TPUModelRunner._init_inputs") and patching.is_applied(p)
                        for p in patching.installed())
    tokens = int(os.environ.get("MIN_TOKEN_BUCKET") or (1 if small_buckets else 16))
    rows = runner_utils.get_padded_num_reqs_with_upper_limit(1, 32)
    model, mesh = build_model(checkpoint, 512)
    stepper = Stepper(model, mesh, 32, 512)
    inputs = stepper.inputs([1], 144, num_tokens=tokens, num_rows=rows)
    stepper.run(False, inputs)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        stepper.run(False, inputs)
        times.append(time.perf_counter() - start)
    return median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archs", nargs="+", default=["llama4", "gemma4"], choices=["llama4", "gemma4"])
    p.add_argument("--tokens", type=int, default=300, help="decode length of the profiled request (<= 384)")
    args = p.parse_args()
    from jaxllm.checkpoints import cached_checkpoint

    spy = py_spy()
    if spy is None:
        print("py-spy not found: CPU times only", file=sys.stderr)
    workdir = Path(tempfile.mkdtemp(prefix="jaxllm-bench-profile-"))
    rows = []
    for arch in args.archs:
        checkpoint = str(cached_checkpoint(arch, "small", multimodal=True))
        engines = [("ours", {"JAXLLM_USE_BUILTIN_MODELS": "0"})]
        if arch == "gemma4":
            engines.append(("built-in", BUILTIN_ENV[arch]))
        for name, env in engines:
            r = profile(f"{arch}-{name}", checkpoint, env, args.tokens, workdir, spy)
            print(f"  {arch} {name}: {r}", file=sys.stderr, flush=True)
            if "error" in r:
                rows.append([arch, name, f"failed: {r['error']}"] + [""] * (5 + len(SHOWN)))
                continue
            alone = model_step_alone(str(cached_checkpoint(arch, "small"))) if name == "ours" else float("nan")
            shares = r.get("shares", {})
            cpu = r["cpu"]
            rows.append([arch, name, fmt(r["tpot"] * 1e3), fmt(alone * 1e3), fmt(cpu.get("XLA", 0) * 1e3),
                         fmt(cpu.get("main", 0) * 1e3), fmt(cpu.get("other", 0) * 1e3),
                         *(f"{100 * shares.get(k, 0):.0f}%" if shares else "-" for k in SHOWN)])
    load = os.getloadavg()
    print(f"\n### Where a batch-1 decode step's time goes (vLLM engine core; {machine()}; load average "
          f"{load[0]:.1f} at the end)\n")
    print(table(["model", "implementation", "TPOT ms", "model step alone ms", "CPU ms/step: XLA threads",
                 "main thread", "other threads", *(f"main thread: {k}" for k in SHOWN)], rows))


if __name__ == "__main__":
    main()
