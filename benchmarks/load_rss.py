"""Host memory while a sharded checkpoint streams in: peak RSS against the weights and the largest tensor.

    python benchmarks/load_rss.py [--gib 2.5] [--shards 5]

Writes a bf16 Llama 4 checkpoint of about `--gib` GiB in `--shards` safetensors files
with an index (names and shapes from transformers' own model built on the meta device,
values random), then, in a fresh process, loads it into our model through vLLM's
loader as the engine does, sampling the process's RSS every 10 ms. On the CPU the
"device" arrays live in the same RAM, so the weights themselves stay resident: the
figure that shows streaming is the peak above the loaded model's final RSS, against
the largest single tensor.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

GIB = 2**30


def write_checkpoint(out: Path, gib: float, shards: int) -> tuple[int, int]:
    """(total bytes, largest tensor's bytes) of a random bf16 Llama 4 text checkpoint of about `gib` GiB."""
    import ml_dtypes
    import numpy as np
    import torch
    from safetensors.numpy import save_file
    from transformers import AutoTokenizer, Llama4ForCausalLM, Llama4TextConfig

    from jaxllm.checkpoints import cached_checkpoint

    layers = max(1, round(gib * GIB / (2 * 60e6)))  # ~60M parameters per layer at these widths
    config = Llama4TextConfig(hidden_size=2048, intermediate_size=1024, intermediate_size_mlp=4096,
                              num_hidden_layers=layers, num_attention_heads=16, num_key_value_heads=4, head_dim=128,
                              num_local_experts=8, vocab_size=32768, torch_dtype="bfloat16")
    config.architectures = ["Llama4ForCausalLM"]
    with torch.device("meta"):
        shapes = {name: tuple(p.shape) for name, p in Llama4ForCausalLM(config).state_dict().items()}
    config.save_pretrained(out)
    AutoTokenizer.from_pretrained(cached_checkpoint("llama4", "tiny")).save_pretrained(out)
    rng = np.random.default_rng(0)
    names = sorted(shapes)
    per_shard = -(-len(names) // shards)
    weight_map, total, largest = {}, 0, 0
    for s in range(shards):
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        tensors = {}
        for name in names[s * per_shard:(s + 1) * per_shard]:
            tensors[name] = (rng.standard_normal(shapes[name], np.float32) * 0.02).astype(ml_dtypes.bfloat16)
            weight_map[name] = file
            total += tensors[name].nbytes
            largest = max(largest, tensors[name].nbytes)
        save_file(tensors, out / file, metadata={"format": "pt"})
        del tensors
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                   "weight_map": weight_map}))
    return total, largest


LOADER = textwrap.dedent("""
    import sys, threading, time, psutil, jax
    from flax import nnx
    from vllm.config import ModelConfig, VllmConfig
    from jaxllm.model.llama4 import JaxLlama4ForCausalLM
    proc = psutil.Process()
    peak = [proc.memory_info().rss]
    done = False
    def sample():
        while not done:
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.01)
    import numpy as np
    config = VllmConfig(model_config=ModelConfig(model=sys.argv[1], dtype="bfloat16", max_model_len=256))
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "model"))
    with jax.set_mesh(mesh):
        model = nnx.eval_shape(lambda: JaxLlama4ForCausalLM(config, jax.random.key(0), mesh))
        before = proc.memory_info().rss
        peak[0] = before
        thread = threading.Thread(target=sample); thread.start()
        start = time.perf_counter()
        model.load_weights(jax.random.key(0))
        jax.block_until_ready(jax.tree.leaves(nnx.state(model)))
        elapsed = time.perf_counter() - start
        done = True; thread.join()
    print(before, proc.memory_info().rss, peak[0], elapsed)
""")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gib", type=float, default=2.5)
    p.add_argument("--shards", type=int, default=5)
    args = p.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    from common import machine

    with tempfile.TemporaryDirectory() as tmp:
        total, largest = write_checkpoint(Path(tmp), args.gib, args.shards)
        out = subprocess.run([sys.executable, "-c", LOADER, tmp], capture_output=True, text=True, check=True)
        before, after, peak, seconds = map(float, out.stdout.split()[-4:])
    print(f"### Loading a sharded bf16 checkpoint through vLLM's loader ({machine()})\n")
    print("| checkpoint | files | largest tensor | RSS before | RSS after (weights resident) | peak RSS "
          "| peak above after | load time |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| {total / GIB:.2f} GiB | {args.shards} | {largest / 2**20:.0f} MiB | {before / GIB:.2f} GiB "
          f"| {after / GIB:.2f} GiB | {peak / GIB:.2f} GiB | {(peak - after) / 2**20:.0f} MiB | {seconds:.1f} s |")


if __name__ == "__main__":
    main()
