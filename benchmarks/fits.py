"""What fits on a TPU slice: the longest context at 1 and 16 concurrent requests, jaxllm vs tpu-inference's models.

For each published model, slice, weight format (bf16, or Qwix int8 / fp8 weights) and
KV-cache dtype (bf16, fp8) this asks vLLM's own planner (`get_kv_cache_configs` and
`get_kv_cache_capacity`, the calls the engine core makes at start-up, as
`kv_capacity.py` does) how many requests of a context length fit, from the published
layer shapes; no model runs and nothing is allocated.

- HBM per chip, as Google publishes it (cloud.google.com/tpu/docs/v5e, /v6e, /v5p):
  v5e 16 GiB, v6e 32 GiB, v5p 95 GiB. Slices as Cloud TPU names them: v5e-8 and v6e-8
  are 8 chips, v6e-4 4 chips, v5p-8 4 chips (8 TensorCores); tensor parallelism over
  all of them, as tpu-inference shards a single-host slice.
- The KV budget is what tpu-inference's worker reports (`determine_available_memory`):
  the slice's HBM x vLLM's default `--gpu-memory-utilization` 0.9, less the weights as
  they sit on the chips (every chip's shard, replicated parameters counted on every chip,
  from our model built abstractly on the slice's mesh). XLA's temporary buffers are not
  modelled. The same weights are assumed for tpu-inference's models.
- Weights: bf16; or Qwix rules `{"module_path": ".*", "weight_qtype": "int8" | "float8_e4m3fn"}`,
  which quantize every weight the model's einsums read (attention, MLPs, experts, routers)
  to 1 byte plus a bf16 scale per output channel, and leave the embeddings and the LM head
  (read outside `__call__`) in bf16, in our models as in tpu-inference's.
- KV specs: tpu-inference's (`KVCacheManager.get_kv_cache_spec`: every layer full length)
  and jaxllm's window-aware plan as on a TPU host (`kv_plan.plan(..., on_tpu=True)`), with the
  runner's KV dtype; the block size tpu-inference picks for the context; vLLM's default
  2048-token prefill chunks (vLLM reserves a window plus two chunks in flight per sliding /
  chunked layer).
- "Longest context": the largest power of two from 1k up to the model's maximum
  (`max_position_embeddings`) at which vLLM's "maximum concurrency" is at least 1 (16).
  The goal is checked at 32k: jaxllm's concurrency at least twice the built-in's; the last
  columns give ours with `--max-num-batched-tokens 512` (fewer tokens reserved in flight).

    python benchmarks/fits.py [--slices v6e-4 ...] [--models "Gemma 4 31B" ...]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):  # meshes of up to 8 chips
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8".strip()

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kv_capacity import GIB, capacity, specs_for, vllm_config_for, write_config  # noqa: E402

# (chips, HBM per chip in GiB)
SLICES = {"v5e-8": (8, 16), "v6e-4": (4, 32), "v6e-8": (8, 32), "v5p-8": (4, 95)}
UTILIZATION = 0.9  # vLLM's default --gpu-memory-utilization

_GEMMA4 = dict(num_attention_heads=32, head_dim=256, global_head_dim=512, attention_k_eq_v=True,
               sliding_window=1024, vocab_size=262144, hidden_size_per_layer_input=0)  # no per-layer inputs (E2B/E4B only)
# Published text configs (DESIGN.md section 9; transformers' Llama4TextConfig defaults are Scout's), and
# each model's longest context (max_position_embeddings): Gemma 4 256k, Scout 10M, Maverick 1M.
MAX_CONTEXT = {"Gemma 4 31B": 262144, "Gemma 4 26B-A4B": 262144, "Llama 4 Scout": 10485760,
               "Llama 4 Maverick": 1048576}
MODELS = {
    "Gemma 4 31B": ("gemma4", dict(_GEMMA4, num_hidden_layers=60, hidden_size=5376, intermediate_size=21504,
                                   num_key_value_heads=16, num_global_key_value_heads=4,
                                   layer_types=(["sliding_attention"] * 5 + ["full_attention"]) * 10)),
    "Gemma 4 26B-A4B": ("gemma4", dict(_GEMMA4, num_hidden_layers=30, hidden_size=2816, intermediate_size=2112,
                                       num_attention_heads=16, num_key_value_heads=8, num_global_key_value_heads=2,
                                       enable_moe_block=True, num_experts=128, top_k_experts=8,
                                       moe_intermediate_size=704,
                                       layer_types=(["sliding_attention"] * 5 + ["full_attention"]) * 5)),
    "Llama 4 Scout": ("llama4", {}),
    "Llama 4 Maverick": ("llama4", dict(num_local_experts=128, interleave_moe_layer_step=2, use_qk_norm=False)),
}
WEIGHTS = ("bf16", "int8", "fp8")
KV_DTYPES = ("bf16", "fp8")
CONCURRENCY = (1, 16)
AT = 32768  # the context of the goal: ours >= 2x the built-in's concurrency
SMALL_CHUNK = 512  # --max-num-batched-tokens for the last columns


def mesh_of(chips: int):
    import jax

    from jaxllm.vllm_plugin.host import plain_mesh

    return plain_mesh((1, chips), ("data", "model"), devices=jax.devices()[:chips])


def weight_bytes(vllm_config, mesh, weights: str) -> int:
    """Bytes the model's weights hold on all chips of `mesh` together, bf16 or Qwix-quantized to 1 byte."""
    import jax
    import numpy as np
    from flax import nnx

    from jaxllm.vllm_plugin.models import our_class

    cls = our_class(vllm_config.model_config.hf_config)
    with jax.set_mesh(mesh):
        model = nnx.eval_shape(lambda: cls(vllm_config, jax.random.key(0), mesh))
    hidden = model.config.hidden_size
    chips = mesh.devices.size
    total = 0
    for path, param in nnx.iter_graph(model):
        if not isinstance(param, nnx.Param):
            continue
        shape = tuple(param.shape)
        axes = set()
        for entry in param.get_metadata("out_sharding", None) or ():
            axes.update(entry if isinstance(entry, tuple) else (entry,))
        shards = int(np.prod([mesh.shape[a] for a in axes if a in mesh.shape]))
        size = int(np.prod(shape))
        quantized = weights != "bf16" and len(shape) >= 2 and path[0] not in ("embed", "lm_head")
        if quantized:
            # 1 byte per value and a bf16 scale per output channel: size / (the axes the einsum contracts).
            if "experts" in path and len(shape) == 3:
                contracted = shape[1]                  # [E, in, out]
            elif len(shape) == 3 and shape[-1] == hidden:
                contracted = shape[0] * shape[1]       # o_proj [N, H, D]
            else:
                contracted = shape[0]                  # [D, ...] input projections, [F, D] down projections
            bytes_ = size + 2 * size // contracted
        else:
            bytes_ = 2 * size
        total += bytes_ * chips // shards
    return total


def concurrencies(arch, config, contexts, mesh, kv_dtype, budget, tmp):
    """{context: (built-in concurrency, ours)} at `budget` bytes of KV cache; 0 where not even one request fits."""
    import torch

    out = {}
    dtype = {"bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn}[kv_dtype]
    for context in contexts:
        folder = write_config(arch, config, Path(tmp) / f"{arch}-{context}", context)
        vllm_config = vllm_config_for(folder, context)
        pair = []
        for windowed in (False, True):
            specs = specs_for(vllm_config, mesh, windowed=windowed, as_on_tpu=True, kv_dtype=dtype)
            try:
                pair.append(capacity(vllm_config, specs, budget)[1] if budget > 0 else 0.0)
            except ValueError:  # vLLM: not even one request of this length fits
                pair.append(0.0)
        out[context] = tuple(pair)
    return out


def ours_with_small_chunks(arch, config, mesh, kv_dtype, budget, tmp, chunk: int) -> float:
    """Our concurrency at AT tokens with `--max-num-batched-tokens chunk` (vLLM reserves fewer tokens in flight)."""
    import torch

    if budget <= 0:
        return 0.0
    folder = write_config(arch, config, Path(tmp) / f"{arch}-{AT}", AT)
    vllm_config = vllm_config_for(folder, AT, chunk)
    dtype = {"bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn}[kv_dtype]
    try:
        return capacity(vllm_config, specs_for(vllm_config, mesh, windowed=True, as_on_tpu=True, kv_dtype=dtype),
                        budget)[1]
    except ValueError:
        return 0.0


def longest(table: dict, which: int, need: float):
    fits = [context for context, pair in table.items() if pair[which] >= need]
    return max(fits) if fits else None


def fmt_context(context):
    if context is None:
        return "—"
    return f"{context // 1048576}M" if context >= 1048576 else f"{context // 1024}k"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", nargs="+", default=list(SLICES))
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    args = parser.parse_args()

    import jaxllm.vllm_plugin as plugin

    plugin.register()
    print("What fits: longest context (powers of two) with 1 and 16 concurrent requests, and requests of 32k at "
          "once, from vLLM's planner on the published configs; KV budget = HBM x 0.9 - weights.\n")
    print("| model | slice | weights | KV | weights GiB | KV budget GiB | built-in: ×1 / ×16 | jaxllm: ×1 / ×16 "
          f"| built-in: 32k requests | jaxllm: 32k requests | × | goal (≥ 2× at 32k) "
          f"| jaxllm, chunks of {SMALL_CHUNK}: 32k requests | × |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            arch, config = MODELS[name]
            max_context = MAX_CONTEXT[name]
            contexts = [2**k for k in range(10, 25) if 2**k <= max_context]
            for slice_name in args.slices:
                chips, hbm = SLICES[slice_name]
                mesh = mesh_of(chips)
                probe = vllm_config_for(write_config(arch, config, Path(tmp) / f"{arch}-probe", 8192), 8192)
                for weights in WEIGHTS:
                    used = weight_bytes(probe, mesh, weights)
                    budget = int(chips * hbm * GIB * UTILIZATION) - used
                    for kv in KV_DTYPES:
                        table = concurrencies(arch, config, contexts, mesh, kv, budget, tmp) if budget > 0 else {}
                        at = table.get(AT, (0.0, 0.0))
                        ours_builtin = [" / ".join(fmt_context(longest(table, which, need)) for need in CONCURRENCY)
                                        for which in (0, 1)]
                        small = ours_with_small_chunks(arch, config, mesh, kv, budget, tmp, SMALL_CHUNK) \
                            if MAX_CONTEXT[name] >= AT else 0.0
                        if at[0] >= 1:
                            ratio, small_ratio = at[1] / at[0], small / at[0]
                            goal = f"{'met' if ratio >= 2 else 'missed'}"
                        else:
                            ratio = small_ratio = None
                            goal = "only jaxllm fits" if at[1] >= 1 else "neither fits"
                        print(f"| {name} | {slice_name} ({chips} × {hbm} GiB) | {weights} | {kv} | {used / GIB:.0f} "
                              f"| {max(budget, 0) / GIB:.0f} | {ours_builtin[0]} | {ours_builtin[1]} | {at[0]:.1f} "
                              f"| {at[1]:.1f} | {'' if ratio is None else f'{ratio:.2f}'} | {goal} | {small:.1f} "
                              f"| {'' if small_ratio is None else f'{small_ratio:.2f}'} |", flush=True)


if __name__ == "__main__":
    main()
