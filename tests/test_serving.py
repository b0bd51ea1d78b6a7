"""`vllm serve` with the plugin, end to end on the CPU, through the examples a user runs.

One server (examples/serve.sh, tiny Llama 4, 127.0.0.1 on a free port) serves every
server test in this module; it is started at the first test that needs it and
stopped at the end. Requests go through the `openai` client as a user's would.
Broken checkpoints are started separately: they must fail at start-up, naming
what is wrong. The server is a separate process, so nothing here initialises JAX
in the pytest process.

Prompts are token ids, so their lengths are exact, and every request sets
`ignore_eos`, so it generates exactly `max_tokens` tokens.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest

from jaxllm.checkpoints import cached_checkpoint

ROOT = Path(__file__).resolve().parents[1]
MAX_MODEL_LEN = 256
SERVER_FLAGS = ["--max-model-len", str(MAX_MODEL_LEN), "--max-num-seqs", "32", "--dtype", "float32",
                "--gpu-memory-utilization", "0.02", "--seed", "0",
                # usage.prompt_tokens_details.cached_tokens: the prefix-cache hits of each request
                "--enable-prompt-tokens-details"]
START_TIMEOUT_S = 600  # generous: imports alone take 15-30 s on a loaded 2-core host
# Ids clear of the special tokens at both ends of the tiny tokenizer's vocabulary.
TOKEN_IDS = (3, 900)


def _env():
    env = dict(os.environ)
    # The editable install records one checkout's path; make sure this checkout's plugin loads.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.setdefault("JAX_PLATFORMS", "cpu")
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(process: subprocess.Popen) -> None:
    """Stop a process started in its own session, and everything it started (the engine core)."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
    try:  # whatever is left of its session: an engine core can outlive the server (seen in benchmarks)
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


def _run_to_exit(cmd: list[str], timeout: float = START_TIMEOUT_S) -> tuple[int, str]:
    """Exit status and output (stdout + stderr) of a command that should fail at start-up."""
    process = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _stop(process)
        pytest.fail(f"{cmd[:3]} still running after {timeout} s: it should have failed at start-up")
    return process.returncode, output


def _prompt(rng, length: int) -> list[int]:
    return rng.integers(*TOKEN_IDS, length).tolist()


# --------------------------------------------------------------------------------------------
# Start-up failures and the checkpoint builder (no server)
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoint() -> Path:
    return cached_checkpoint("llama4", "tiny")


def test_missing_tensor_fails_serve_start_naming_it(checkpoint, tmp_path):
    from harness import broken_copy

    broken = broken_copy(checkpoint, tmp_path, lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"))
    rc, output = _run_to_exit(["bash", "examples/serve.sh", "--model", str(broken), "--port", str(_free_port()),
                               *SERVER_FLAGS])
    assert rc != 0
    # The error itself, not only a trace: the exception with the layer and projection named.
    assert re.search(r"CheckpointError: .*no tensor for .*layers\.1\.attn\.k_proj", output), output[-3000:]


def test_unsupported_config_field_fails_offline_start_naming_it(checkpoint, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(checkpoint, broken)
    config = json.loads((broken / "config.json").read_text())
    config["hidden_act"] = "gelu"
    (broken / "config.json").write_text(json.dumps(config))
    rc, output = _run_to_exit([sys.executable, "examples/offline_batch.py", "--model", str(broken),
                               "--max-model-len", str(MAX_MODEL_LEN), "--gpu-memory-utilization", "0.02"])
    assert rc != 0
    assert re.search(r"UnsupportedConfigError: .*hidden_act='gelu'", output), output[-3000:]


def test_checkpoint_builder_command_line(tmp_path):
    out = tmp_path / "gemma4-tiny"
    result = subprocess.run([sys.executable, "-m", "jaxllm.checkpoints", "--arch", "gemma4", "--size", "tiny",
                             str(out)], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "architecture: Gemma4ForCausalLM (gemma4, tiny, float32)" in result.stdout
    expected = {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                "tokenizer_config.json"}
    assert expected <= {p.name for p in out.iterdir()}


# --------------------------------------------------------------------------------------------
# The server
# --------------------------------------------------------------------------------------------

class Server:
    def __init__(self, model: Path, log: Path, flags: list[str] = SERVER_FLAGS):
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = log
        with open(log, "w") as f:
            self.process = subprocess.Popen(
                ["bash", "examples/serve.sh", "--model", str(model), "--host", "127.0.0.1",
                 "--port", str(self.port), *flags],
                cwd=ROOT, env=_env(), stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        self.model = str(model)

    def log_tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:]

    def wait_ready(self) -> float | None:
        """Seconds to readiness, or None if another process took the port first."""
        start = time.monotonic()
        while time.monotonic() - start < START_TIMEOUT_S:
            if self.process.poll() is not None:
                if "address already in use" in self.log_tail().lower():
                    return None
                pytest.fail(f"server exited with {self.process.returncode}:\n{self.log_tail()}")
            if self.health() == 200:
                return time.monotonic() - start
            time.sleep(1)
        pytest.fail(f"server not ready after {START_TIMEOUT_S} s:\n{self.log_tail()}")

    def health(self) -> int | None:
        try:
            return httpx.get(f"{self.base}/health", timeout=5).status_code
        except httpx.HTTPError:
            return None

    def metrics(self) -> dict[str, float]:
        """Prometheus samples of this engine, by metric name with labels other than model/engine."""
        samples = {}
        for line in httpx.get(f"{self.base}/metrics", timeout=10).text.splitlines():
            match = re.match(r"^(vllm:\w+)(?:\{(.*)\})? (\S+)$", line)
            if match:
                name, labels, value = match.groups()
                kept = [label for label in (labels or "").split(",")
                        if label and not label.startswith(("model_name=", "engine="))]
                samples[name + (f"{{{','.join(kept)}}}" if kept else "")] = float(value)
        return samples

    def wait_idle(self, timeout: float = 120) -> dict[str, float]:
        """Metrics once no request is running or waiting (aborts are processed asynchronously)."""
        deadline = time.monotonic() + timeout
        while True:
            m = self.metrics()
            if m["vllm:num_requests_running"] == 0 and m["vllm:num_requests_waiting"] == 0:
                return m
            if time.monotonic() > deadline:
                pytest.fail(f"requests still running or waiting after {timeout} s: {m}")
            time.sleep(0.5)

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.base}/v1", api_key="EMPTY", max_retries=0, timeout=300)

    def async_client(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"{self.base}/v1", api_key="EMPTY", max_retries=0, timeout=300)


def serve(checkpoint, logs: Path, flags: list[str] = SERVER_FLAGS):
    """A running server for a module's tests (a generator for a module fixture), stopped after them."""
    # The free port is only reserved once the server binds it; another process on the
    # host may take it in between, so try a few.
    for attempt in range(3):
        server = Server(checkpoint, logs / f"server-{attempt}.log", flags)
        try:
            ready = server.wait_ready()
            if ready is not None:
                print(f"\nserver ready in {ready:.1f} s")
                yield server
                return
        finally:
            _stop(server.process)
    pytest.fail("no free port for the server in 3 tries")


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    yield from serve(checkpoint, tmp_path_factory.mktemp("serve"))


def _greedy(**extra) -> dict:
    """Request fields for exact-length greedy decoding, with token ids returned."""
    return dict(temperature=0.0, extra_body={"ignore_eos": True, "return_token_ids": True, **extra})


def _complete(server, prompt, max_tokens, **extra):
    """(generated token ids, usage) of one non-streamed greedy completion."""
    r = server.client().completions.create(model=server.model, prompt=prompt, max_tokens=max_tokens,
                                           **_greedy(**extra))
    assert r.choices[0].finish_reason == "length"
    return r.choices[0].model_extra["token_ids"], r.usage


async def _stream(client, model, prompt, max_tokens, cancel_after=None, on_token=None, **extra):
    """Generated token ids, usage and finish reason of one streamed greedy completion.

    With `cancel_after`, the client closes the stream once that many tokens have
    arrived, as a user who goes away would; usage and finish reason are then None.
    """
    stream = await client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, stream=True,
                                             stream_options={"include_usage": True}, **_greedy(**extra))
    tokens, usage, finish = [], None, None
    async for chunk in stream:
        if chunk.choices:
            tokens += chunk.choices[0].model_extra.get("token_ids") or []
            finish = chunk.choices[0].finish_reason or finish
            if on_token:
                on_token(len(tokens))
        usage = chunk.usage or usage
        if cancel_after is not None and len(tokens) >= cancel_after:
            await stream.close()
            break
    return tokens, usage, finish


def test_client_example(server):
    result = subprocess.run([sys.executable, "examples/client.py", "--base-url", f"{server.base}/v1",
                             "--max-tokens", "8", "--ignore-eos"],
                            cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    for kind in ("completion", "chat", "streamed completion", "streamed chat"):
        assert re.search(rf"^--- {kind}\n(.*\n)*?\(8 tokens in ", result.stdout, re.M), result.stdout


NUM_CONCURRENT = 64
CANCELLED = (5, 40)  # indices of the requests whose client goes away mid-stream
CANCEL_AFTER = 4  # tokens received before going away
CANCELLED_MAX_TOKENS = 200  # far more than they get to generate, so a missed abort shows


def test_concurrent_streams_with_cancellations(server):
    rng = np.random.default_rng(64)
    jobs = []
    for i in range(NUM_CONCURRENT):
        if i in CANCELLED:
            prompt_len, max_tokens = int(rng.integers(1, MAX_MODEL_LEN - CANCELLED_MAX_TOKENS)), CANCELLED_MAX_TOKENS
        else:
            prompt_len, max_tokens = int(rng.integers(1, 160)), int(rng.integers(1, 64))
        jobs.append((_prompt(rng, prompt_len), max_tokens))
    before = server.wait_idle()

    async def run_all():
        client = server.async_client()
        return await asyncio.gather(*(
            _stream(client, server.model, prompt, max_tokens, cancel_after=CANCEL_AFTER if i in CANCELLED else None)
            for i, (prompt, max_tokens) in enumerate(jobs)))

    start = time.perf_counter()
    results = asyncio.run(run_all())
    wall = time.perf_counter() - start
    after = server.wait_idle()

    completed = [(tokens, usage, finish, max_tokens) for i, ((tokens, usage, finish), (_, max_tokens))
                 in enumerate(zip(results, jobs)) if i not in CANCELLED]
    wrong = {i: (len(tokens), usage and usage.completion_tokens, finish, max_tokens)
             for i, (tokens, usage, finish, max_tokens) in enumerate(completed)
             if not (usage and len(tokens) == usage.completion_tokens == max_tokens and finish == "length")}
    assert wrong == {}, "requests without exactly max_tokens tokens: {i: (got, usage, finish, asked)}"
    # A chunk can carry several tokens when the client lags, so "at least".
    received = [len(results[i][0]) for i in CANCELLED]
    assert all(CANCEL_AFTER <= n < CANCELLED_MAX_TOKENS for n in received), received

    # The server stopped generating for the cancelled requests: all it generated beyond
    # the completed requests' tokens is what the cancelled ones got before their abort.
    generated = after["vllm:generation_tokens_total"] - before["vllm:generation_tokens_total"]
    completed_tokens = sum(max_tokens for *_, max_tokens in completed)
    after_cancel = generated - completed_tokens
    assert sum(received) <= after_cancel < len(CANCELLED) * CANCELLED_MAX_TOKENS
    prompt_tokens = after["vllm:prompt_tokens_total"] - before["vllm:prompt_tokens_total"]
    print(f"\n{NUM_CONCURRENT} concurrent streamed requests ({len(CANCELLED)} cancelled after {CANCEL_AFTER} "
          f"tokens): {len(completed)} completed with exact token counts, 0 lost; wall {wall:.2f} s; "
          f"{prompt_tokens:.0f} prompt + {generated:.0f} generated tokens ({generated / wall:.1f} generated/s); "
          f"the cancelled requests generated {after_cancel:.0f} tokens in all")

    assert server.health() == 200
    tokens, _ = _complete(server, _prompt(rng, 10), 12)
    assert len(tokens) == 12


def test_over_length_prompt_is_refused_and_the_server_goes_on(server):
    rng = np.random.default_rng(1)
    client = server.client()
    with pytest.raises(openai.BadRequestError) as refused:
        client.completions.create(model=server.model, prompt=_prompt(rng, MAX_MODEL_LEN + 40), max_tokens=4)
    assert refused.value.status_code == 400
    assert f"maximum context length is {MAX_MODEL_LEN} tokens" in str(refused.value)
    # A prompt that fits, but not with all the tokens asked for: vLLM generates up to the limit.
    tokens, _ = _complete(server, _prompt(rng, MAX_MODEL_LEN - 10), 20)
    assert len(tokens) == 10

    tokens, _ = _complete(server, _prompt(rng, 20), 8)
    assert len(tokens) == 8


def test_greedy_tokens_do_not_depend_on_the_batch(server):
    rng = np.random.default_rng(2)
    target, target_tokens = _prompt(rng, 70), 40
    # Different cache salts keep the prefix cache out of it: every run computes the whole prompt.
    alone, _ = _complete(server, target, target_tokens, cache_salt="alone")

    # A ragged batch: prompts of other lengths start with the target, more join once
    # it is decoding (their prefills share its decode steps), and they finish at
    # different steps.
    first_wave = [(_prompt(rng, n), m) for n, m in ((3, 30), (17, 5), (45, 50), (120, 12))]
    second_wave = [(_prompt(rng, n), m) for n, m in ((90, 20), (8, 35), (33, 3))]

    async def batched():
        client = server.async_client()
        joined = asyncio.Event()

        def join_at_fourth_token(count):
            if count >= 4:
                joined.set()

        async def later():
            await joined.wait()
            return await asyncio.gather(*(_stream(client, server.model, p, m, cache_salt="batch")
                                          for p, m in second_wave))

        results = await asyncio.gather(
            _stream(client, server.model, target, target_tokens, on_token=join_at_fourth_token, cache_salt="batch"),
            *(_stream(client, server.model, p, m, cache_salt="batch") for p, m in first_wave), later())
        return results[0][0]

    assert asyncio.run(batched()) == alone


def test_repeated_prompt_hits_the_prefix_cache_with_identical_output(server):
    rng = np.random.default_rng(3)
    prompt = _prompt(rng, 100)
    before = server.wait_idle()
    first, first_usage = _complete(server, prompt, 24)
    second, second_usage = _complete(server, prompt, 24)
    hits = server.wait_idle()["vllm:prefix_cache_hits_total"] - before["vllm:prefix_cache_hits_total"]

    assert first_usage.prompt_tokens_details.cached_tokens == 0
    cached = second_usage.prompt_tokens_details.cached_tokens
    # Whole KV blocks are cached, and the last prompt token is always recomputed.
    assert 64 <= cached < len(prompt)
    assert hits == cached
    assert second == first
    print(f"\nprefix cache: {cached} of {len(prompt)} prompt tokens reused")
