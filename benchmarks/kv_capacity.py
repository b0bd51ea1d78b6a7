"""KV-cache capacity at one memory budget: jaxllm's window-aware cache vs tpu-inference's sizing.

For each published layer pattern and context length this asks vLLM's own planner
(`get_kv_cache_configs`, the call the engine core makes at start-up) for the pool
and reports what vLLM logs at start-up: "KV cache size: N tokens, Maximum
concurrency for L tokens per request: X". The specs come from
- jaxllm: `jaxllm.vllm_plugin.kv_plan.plan` (sliding / chunked / full per layer);
- built-in: tpu-inference's `KVCacheManager.get_kv_cache_spec`, which its own
  Llama 4 and Gemma 4 get (every layer full length).
Both on the same vLLM config, budget, block size and KV dtype (bf16). Only the
config is read: no weights are made and no cache is allocated, so the real
hidden sizes and layer counts are kept; nothing is reduced.

    python benchmarks/kv_capacity.py [--budget-gib 128] [--contexts 8192 32768 131072]
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # vLLM logs to stdout, where the table goes

GIB = 2**30

# Layer patterns and per-layer KV shapes as published (MaxText's gemma4-31b / gemma4-26b configs,
# transformers' defaults for Gemma4TextConfig and Llama4TextConfig, which are Llama 4 Scout's).
MODELS = {
    "Gemma 4 31B": dict(arch="gemma4", goal=(32768, 6.0), config=dict(
        num_hidden_layers=60, hidden_size=5376, num_attention_heads=32, num_key_value_heads=16, head_dim=256,
        num_global_key_value_heads=4, global_head_dim=512, attention_k_eq_v=True, sliding_window=1024,
        layer_types=(["sliding_attention"] * 5 + ["full_attention"]) * 10)),
    "Gemma 4 26B-A4B": dict(arch="gemma4", goal=None, config=dict(
        num_hidden_layers=30, hidden_size=2816, num_attention_heads=16, num_key_value_heads=8, head_dim=256,
        num_global_key_value_heads=2, global_head_dim=512, attention_k_eq_v=True, sliding_window=1024,
        enable_moe_block=True, num_experts=128, top_k_experts=8, moe_intermediate_size=704,
        layer_types=(["sliding_attention"] * 5 + ["full_attention"]) * 5)),
    "Gemma 4 (transformers default)": dict(arch="gemma4", goal=(32768, 3.0), config={}),
    "Llama 4 Scout": dict(arch="llama4", goal=(131072, 3.0), config={}),
}


def write_config(arch: str, overrides: dict, folder: Path, max_len: int) -> Path:
    from transformers import Gemma4TextConfig, Llama4TextConfig

    if arch == "gemma4":
        config = Gemma4TextConfig(**overrides, max_position_embeddings=max(max_len, 131072))
        config.architectures = ["Gemma4ForCausalLM"]
    else:
        config = Llama4TextConfig(**overrides, max_position_embeddings=max(max_len, 131072))
        config.architectures = ["Llama4ForCausalLM"]
    config.save_pretrained(folder)
    return folder


def vllm_config_for(model_dir: Path, max_len: int, max_num_batched_tokens: int | None = None):
    from vllm.engine.arg_utils import EngineArgs

    return EngineArgs(model=str(model_dir), max_model_len=max_len, dtype="bfloat16", load_format="dummy",
                      skip_tokenizer_init=True, max_num_batched_tokens=max_num_batched_tokens).create_engine_config()


def capacity(vllm_config, specs: dict, budget: int) -> tuple[int, float, int]:
    """(KV-cache tokens, max concurrency at max_model_len, groups) as vLLM computes and logs them."""
    import copy

    from vllm.v1.attention.backends.utils import record_kv_cache_layout
    from vllm.v1.core.kv_cache_planning import get_kv_cache_configs
    from vllm.v1.core.kv_cache_utils import get_kv_cache_capacity

    config = copy.deepcopy(vllm_config)
    record_kv_cache_layout(config.cache_config, "LBNHC")  # what the engine core resolves for tpu-inference
    kv_cache_config = get_kv_cache_configs(config, [specs], [budget])[0]
    tokens, concurrency = get_kv_cache_capacity(config, kv_cache_config)
    return tokens, concurrency, len(kv_cache_config.kv_cache_groups)


def specs_for(vllm_config, mesh, windowed: bool, as_on_tpu: bool = False, kv_dtype=None) -> dict:
    """The specs the runner reports; `as_on_tpu`: plan as on a TPU host (one buffer per row layout);
    `kv_dtype`: the runner's KV-cache dtype (torch; default bf16)."""
    import torch
    from tpu_inference.runner.kv_cache_manager import KVCacheManager

    from jaxllm.vllm_plugin import kv_plan
    from jaxllm.vllm_plugin.models import our_class

    runner = SimpleNamespace(model=None, model_config=vllm_config.model_config, vllm_config=vllm_config,
                             cache_config=vllm_config.cache_config, parallel_config=vllm_config.parallel_config,
                             speculative_config=None, mesh=mesh, kv_cache_dtype=kv_dtype or torch.bfloat16,
                             attention_backend=None)
    if windowed:
        hf_config = vllm_config.model_config.hf_config
        layers = our_class(hf_config).config_class.from_hf(hf_config).kv_layers()
        plan = kv_plan.plan(layers, runner, on_tpu=as_on_tpu)
        if plan is not None:
            return plan.specs
    return KVCacheManager(runner).get_kv_cache_spec()  # tpu-inference's own: the runner serves none of ours


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget-gib", type=float, default=128.0,
                        help="KV-cache memory (planned as one device: tensor parallelism divides every layer's "
                             "heads alike, so the ratios hold); 128 GiB lets the built-in fit one 128k request "
                             "of Gemma 4 31B")
    parser.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768, 131072])
    parser.add_argument("--small-chunk", type=int, default=512,
                        help="a smaller --max-num-batched-tokens for the last columns")
    args = parser.parse_args()

    import jax

    import jaxllm.vllm_plugin as plugin
    from jaxllm.vllm_plugin.host import plain_mesh

    plugin.register()
    mesh = plain_mesh((1, 1), ("data", "model"), devices=jax.devices()[:1])
    budget = int(args.budget_gib * GIB)
    print(f"KV-cache capacity at {args.budget_gib:g} GiB of bf16 KV cache, from vLLM's planner: "
          f"the pool's tokens, and the requests of the context length that fit at once (vLLM's 'maximum "
          f"concurrency'). vLLM reserves, per sliding or chunked layer, its window plus every token that may be in "
          f"flight (2 batches of max_num_batched_tokens with async scheduling); the last columns use "
          f"--max-num-batched-tokens {args.small_chunk} (the built-in's figures do not change with it). "
          f"'On TPU' plans as on a TPU host, where Gemma 4's two row layouts get separate buffers.\n")
    print("| model | context | built-in: tokens | built-in: concurrency | jaxllm: tokens | jaxllm: concurrency "
          f"| × | goal | chunks of {args.small_chunk}: concurrency | × | on TPU: concurrency | × |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name, model in MODELS.items():
            for max_len in args.contexts:
                folder = write_config(model["arch"], model["config"], Path(tmp) / f"{name}-{max_len}", max_len)
                vllm_config = vllm_config_for(folder, max_len)
                builtin = capacity(vllm_config, specs_for(vllm_config, mesh, windowed=False), budget)
                ours = capacity(vllm_config, specs_for(vllm_config, mesh, windowed=True), budget)
                small = vllm_config_for(folder, max_len, args.small_chunk)
                ours_small = capacity(small, specs_for(small, mesh, windowed=True), budget)
                ours_tpu = capacity(vllm_config, specs_for(vllm_config, mesh, windowed=True, as_on_tpu=True), budget)
                ratio = ours[1] / builtin[1]
                goal = model["goal"]
                verdict = ""
                if goal is not None and goal[0] == max_len:
                    verdict = f"≥ {goal[1]:g}×: {'met' if ratio >= goal[1] else 'missed'}"
                print(f"| {name} | {max_len // 1024}k | {builtin[0]:,} | {builtin[1]:.2f} | {ours[0]:,} "
                      f"| {ours[1]:.2f} | {ratio:.2f} | {verdict} | {ours_small[1]:.2f} "
                      f"| {ours_small[1] / builtin[1]:.2f} | {ours_tpu[1]:.2f} | {ours_tpu[1] / builtin[1]:.2f} |",
                      flush=True)

if __name__ == "__main__":
    main()
