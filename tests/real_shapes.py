"""The published Llama 4 and Gemma 4 shapes through `vllm.LLM` on simulated CPU devices (`make smoke`).

    python tests/real_shapes.py [--models gemma4-31b ...] [--tp 8 4] [--warmup-all]

Every dimension is the released model's (DESIGN.md §9 and transformers' configs: hidden
sizes, heads, head sizes, vocabularies, FFN widths, windows, chunks, RoPE); only the
layer count is cut (keeping one layer of each kind: sliding and full, RoPE-chunked and
NoPE, dense and MoE, KV-shared) and, for Llama 4, the expert count, so that bf16 weights
fit this 24 GiB machine. Weights are vLLM's `load_format="dummy"`, in bf16. Each run is a
fresh process with 8 simulated devices: start-up, a short greedy generation, the KV-cache
layout the plugin logged, start-up time and the peak RSS of the process and its engine
core. The first model of each family runs tpu-inference's warm-up (as users run it);
the others skip it to save time.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

LLAMA4 = dict(hidden_size=5120, num_attention_heads=40, num_key_value_heads=8, head_dim=128, intermediate_size=8192,
              intermediate_size_mlp=16384, num_experts_per_tok=1, vocab_size=202048, attention_chunk_size=8192,
              max_position_embeddings=10485760, floor_scale=8192, attn_scale=0.1, attn_temperature_tuning=True,
              rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 16.0, "low_freq_factor": 1.0,
                               "high_freq_factor": 1.0, "original_max_position_embeddings": 8192})
GEMMA4_31B = dict(hidden_size=5376, num_attention_heads=32, num_key_value_heads=16, head_dim=256, global_head_dim=512,
                  num_global_key_value_heads=4, attention_k_eq_v=True, intermediate_size=21504, vocab_size=262144,
                  sliding_window=1024, final_logit_softcapping=30.0, hidden_size_per_layer_input=0)
GEMMA4_E = dict(head_dim=256, global_head_dim=512, vocab_size=262144, vocab_size_per_layer_input=262144,
                sliding_window=512, final_logit_softcapping=30.0, hidden_size_per_layer_input=256,
                use_double_wide_mlp=True)

MODELS = {
    # name: (family, transformers config class, fields)
    "llama4-scout": ("llama4", "Llama4TextConfig", dict(
        LLAMA4, num_hidden_layers=2, no_rope_layers=[1, 0], num_local_experts=8, interleave_moe_layer_step=1,
        use_qk_norm=True)),
    "llama4-maverick": ("llama4", "Llama4TextConfig", dict(
        LLAMA4, num_hidden_layers=2, no_rope_layers=[1, 0], num_local_experts=8, interleave_moe_layer_step=2,
        use_qk_norm=False)),
    "gemma4-31b": ("gemma4", "Gemma4TextConfig", dict(
        GEMMA4_31B, num_hidden_layers=2, layer_types=["sliding_attention", "full_attention"])),
    "gemma4-26b-a4b": ("gemma4", "Gemma4TextConfig", dict(
        GEMMA4_31B, hidden_size=2816, num_attention_heads=16, num_key_value_heads=8, num_global_key_value_heads=2,
        intermediate_size=2112, enable_moe_block=True, num_experts=128, top_k_experts=8, moe_intermediate_size=704,
        num_hidden_layers=2, layer_types=["sliding_attention", "full_attention"])),
    "gemma4-e2b": ("gemma4", "Gemma4TextConfig", dict(
        GEMMA4_E, hidden_size=1536, num_attention_heads=8, num_key_value_heads=1, intermediate_size=6144,
        num_hidden_layers=4, num_kv_shared_layers=2,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"])),
    "gemma4-e4b": ("gemma4", "Gemma4TextConfig", dict(
        GEMMA4_E, hidden_size=2560, num_attention_heads=8, num_key_value_heads=2, intermediate_size=10240,
        num_hidden_layers=4, num_kv_shared_layers=2,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"])),
}
ARCHITECTURE = {"llama4": "Llama4ForCausalLM", "gemma4": "Gemma4ForCausalLM"}

# Run in a fresh process: one engine, then a JSON line.
RUN = r"""
import json, sys, time
from vllm import LLM, SamplingParams
folder, tp = sys.argv[1], int(sys.argv[2])
start = time.perf_counter()
llm = LLM(model=folder, load_format="dummy", dtype="bfloat16", tensor_parallel_size=tp, max_model_len=4096,
          max_num_seqs=4, max_num_batched_tokens=512, num_gpu_blocks_override=512, skip_tokenizer_init=True,
          gpu_memory_utilization=0.9, seed=0)
startup = time.perf_counter() - start
outputs = llm.generate([{"prompt_token_ids": list(range(10, 74))}] * 2,
                       SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, detokenize=False))
print("RESULT " + json.dumps({"startup_s": startup, "tokens": [len(o.outputs[0].token_ids) for o in outputs]}))
"""


def write_config(name: str, folder: Path) -> Path:
    import transformers

    family, config_class, fields = MODELS[name]
    config = getattr(transformers, config_class)(**fields)
    config.architectures = [ARCHITECTURE[family]]
    config.dtype = "bfloat16"
    config.save_pretrained(folder)
    return folder


def run(name: str, tp: int, warmup: bool, workdir: Path, timeout: float = 1800) -> dict:
    """One model at one TP in a fresh process: start-up seconds, tokens, KV layout, peak RSS (GiB)."""
    import psutil

    folder = write_config(name, workdir / name)
    env = dict(os.environ, JAX_PLATFORMS="cpu", SKIP_JAX_PRECOMPILE="0" if warmup else "1",
               XLA_FLAGS="--xla_force_host_platform_device_count=8", JAXLLM_HOST_MEMORY_GB="22",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    process = subprocess.Popen([sys.executable, "-c", RUN, str(folder), str(tp)], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    peak = [0]

    def sample():
        root = psutil.Process(process.pid)
        while process.poll() is None:
            try:
                tree = [root, *root.children(recursive=True)]
                peak[0] = max(peak[0], sum(p.memory_info().rss for p in tree))
            except psutil.Error:
                pass
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        output, _ = process.communicate(timeout=timeout)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, 9)
        try:
            os.killpg(process.pid, 9)  # an engine core that outlived the run
        except ProcessLookupError:
            pass
    sampler.join()
    result = {"model": name, "tp": tp, "warmup": warmup, "peak_rss_gib": peak[0] / 2**30, "ok": False,
              "tail": output[-3000:]}
    layout = re.findall(r"jaxllm: (window-aware KV cache: [^\n]*|full-length KV cache: [^\n]*|KV cache: [^\n]*)",
                        output)
    result["kv_layout"] = " / ".join(dict.fromkeys(layout))
    match = re.search(r"^RESULT (.*)$", output, re.M)
    if match and process.returncode == 0:
        result.update(json.loads(match.group(1)), ok=True)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--tp", nargs="+", type=int, default=[8, 4])
    p.add_argument("--warmup-all", action="store_true", help="run tpu-inference's warm-up for every model")
    args = p.parse_args()
    warmed: set[str] = set()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            for tp in args.tp:
                family = MODELS[name][0]
                warmup = args.warmup_all or family not in warmed
                warmed.add(family)
                result = run(name, tp, warmup, Path(tmp))
                rows.append(result)
                status = "ok" if result["ok"] else "FAILED"
                print(f"{name} TP {tp}: {status}, start-up {result.get('startup_s', float('nan')):.0f} s, "
                      f"peak RSS {result['peak_rss_gib']:.1f} GiB, tokens {result.get('tokens')}", file=sys.stderr,
                      flush=True)
                if not result["ok"]:
                    print(result["tail"], file=sys.stderr)
    print("| model | TP | warm-up | start-up s | peak RSS GiB | tokens generated | KV cache |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['tp']} | {'on' if r['warmup'] else 'off'} | "
              f"{r.get('startup_s', float('nan')):.0f} | {r['peak_rss_gib']:.1f} | "
              f"{'FAILED' if not r['ok'] else sum(r['tokens'])} | {r['kv_layout']} |")
    sys.exit(0 if all(r["ok"] for r in rows) else 1)


if __name__ == "__main__":
    main()
