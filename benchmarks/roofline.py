"""The machine's limits (copy bandwidth, fp32 matmul FLOP/s) and a decode step's roofline.

    python benchmarks/roofline.py [CHECKPOINT]     # prints the limits (and a checkpoint's byte/FLOP counts)

roofline(step) = max((weight bytes + KV bytes read) / bandwidth, 2 * active params * batch / peak)
is the fastest a decode step could run on this machine; benchmarks/serving.py reports
measured steps as a percentage of it.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import fmt, median  # noqa: E402


def copy_bandwidth(megabytes: int = 256, repeats: int = 7) -> float:
    """STREAM-style copy: (bytes read + bytes written) / s of one large array copy."""
    src = np.ones(megabytes * 2 ** 20 // 4, np.float32)
    dst = np.empty_like(src)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(dst, src)
        times.append(time.perf_counter() - start)
    return 2 * src.nbytes / median(times)


def matmul_peak(n: int = 1024, repeats: int = 7) -> dict[str, float]:
    """fp32 FLOP/s of an n x n x n matmul in XLA (our model's backend) and in torch (HF's)."""
    import jax
    import jax.numpy as jnp
    import torch

    a = jnp.ones((n, n), jnp.float32)
    mm = jax.jit(lambda x, y: x @ y)
    mm(a, a).block_until_ready()
    ta = torch.ones((n, n))
    torch.mm(ta, ta)
    xla, eager = [], []
    for _ in range(repeats):  # alternate, so machine load hits both alike
        start = time.perf_counter()
        mm(a, a).block_until_ready()
        xla.append(time.perf_counter() - start)
        start = time.perf_counter()
        torch.mm(ta, ta)
        eager.append(time.perf_counter() - start)
    flops = 2 * n ** 3
    return {"xla": flops / median(xla), "torch": flops / median(eager)}


def machine_limits() -> dict[str, float]:
    peaks = matmul_peak()
    return {"bandwidth": copy_bandwidth(), "peak": max(peaks.values()), **{f"peak_{k}": v for k, v in peaks.items()}}


def _tensor_shapes(checkpoint: Path) -> dict[str, list[int]]:
    """name -> shape from the safetensors headers (no tensor is read)."""
    shapes = {}
    for file in sorted(checkpoint.glob("*.safetensors")):
        with open(file, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size))
        shapes.update({k: v["shape"] for k, v in header.items() if k != "__metadata__"})
    return shapes


def text_config(checkpoint: Path) -> dict:
    config = json.loads((checkpoint / "config.json").read_text())
    return config.get("text_config", config)


class DecodeCost:
    """Bytes and FLOPs one decode step of a text model needs at a given batch and context.

    Only what an ideal implementation must touch: the embedding table is a gather (a few
    rows, ignored) unless tied as the LM head; expert weights count only for the experts
    that some token of the batch chose (expected number, uniform routing); KV reads stop
    at the sliding window / attention chunk.
    """

    def __init__(self, checkpoint: str | Path, bytes_per_param: int = 4):
        self.config = c = text_config(Path(checkpoint))
        self.bytes_per_param = bytes_per_param
        self.dense = self.experts = 0
        for name, shape in _tensor_shapes(Path(checkpoint)).items():
            if any(part in name for part in ("vision", "multi_modal_projector", "audio", "embed_vision")):
                continue
            n = int(np.prod(shape))
            if "embed_tokens" in name and not (c.get("tie_word_embeddings") and "per_layer" not in name):
                continue  # a gather; a tied table is read whole as the LM head, below
            if "lm_head" in name and c.get("tie_word_embeddings"):
                continue  # a saved copy of the tied table
            if ".experts." in name:
                self.experts += n
            else:
                self.dense += n
        self.num_experts = c.get("num_local_experts") or c.get("num_experts") or 1
        self.top_k = c.get("num_experts_per_tok") or c.get("top_k_experts") or 1

    def expected_experts_read(self, batch: int) -> float:
        """Expected share of expert weights read when `batch` tokens each pick top_k of E at random."""
        if not self.experts:
            return 0.0
        return 1 - (1 - self.top_k / self.num_experts) ** batch

    def weight_bytes(self, batch: int) -> float:
        return (self.dense + self.experts * self.expected_experts_read(batch)) * self.bytes_per_param

    def active_params(self) -> float:
        return self.dense + self.experts * self.top_k / self.num_experts

    def kv_bytes(self, batch: int, context: int) -> float:
        """K and V of every attended token of every layer, for `batch` requests at `context` tokens."""
        c = self.config
        total = 0
        for i in range(c["num_hidden_layers"]):
            heads, head_dim, limit = c["num_key_value_heads"], c.get("head_dim"), context
            if "layer_types" in c:  # Gemma 4
                if c["layer_types"][i] == "sliding_attention":
                    limit = min(context, c["sliding_window"])
                else:
                    heads = c.get("num_global_key_value_heads") or heads
                    head_dim = c.get("global_head_dim") or head_dim
            elif c.get("no_rope_layers") and c["no_rope_layers"][i] and c.get("attention_chunk_size"):
                limit = min(context, c["attention_chunk_size"])  # Llama 4 chunked layer (upper bound)
            total += 2 * heads * head_dim * limit
        return batch * total * self.bytes_per_param

    def attention_flops(self, batch: int, context: int) -> float:
        """QK and PV FLOPs of `batch` decode tokens at `context` tokens (the new one included): 4 x heads x
        head_dim x keys attended, per layer; keys stop at the sliding window / the start of the attention chunk."""
        c = self.config
        position = context - 1
        total = 0
        for i in range(c["num_hidden_layers"]):
            head_dim, keys = c.get("head_dim"), context
            if "layer_types" in c and "sliding_window" in c:  # Gemma 4
                if c["layer_types"][i] == "sliding_attention":
                    keys = min(context, c["sliding_window"])
                else:
                    head_dim = c.get("global_head_dim") or head_dim
            elif c.get("no_rope_layers") and c["no_rope_layers"][i] and c.get("attention_chunk_size"):
                keys = position % c["attention_chunk_size"] + 1  # Llama 4 chunked layer
            total += 4 * c["num_attention_heads"] * head_dim * keys
        return batch * total

    def step_seconds(self, limits: dict, batch: int, context: int) -> float:
        memory = (self.weight_bytes(batch) + self.kv_bytes(batch, context)) / limits["bandwidth"]
        compute = 2 * self.active_params() * batch / limits["peak"]
        return max(memory, compute)


def main() -> None:
    limits = machine_limits()
    print(f"copy bandwidth {limits['bandwidth'] / 1e9:.1f} GB/s; fp32 matmul peak "
          f"{limits['peak_xla'] / 1e9:.1f} GFLOP/s (XLA), {limits['peak_torch'] / 1e9:.1f} GFLOP/s (torch)")
    for path in sys.argv[1:]:
        cost = DecodeCost(path)
        for batch in (1, 16):
            print(f"{path}: batch {batch}: weights {cost.weight_bytes(batch) / 1e6:.1f} MB, "
                  f"KV {cost.kv_bytes(batch, 144) / 1e6:.2f} MB at 144 tokens, active params "
                  f"{cost.active_params() / 1e6:.1f} M, roofline {fmt(cost.step_seconds(limits, batch, 144) * 1e3)} ms")


if __name__ == "__main__":
    main()
