"""The fast case of the real-shape smoke suite (`make smoke` runs all six published shapes at TP 8 and 4).

Gemma 4 E2B's published widths (262144-token vocabularies, per-layer inputs, KV sharing,
the sliding window) cut to four layers, dummy bf16 weights, through `vllm.LLM` at tensor
parallel 4 on simulated devices, in a fresh process: it starts, generates, and the
plugin logs the window-aware KV cache it laid out.
"""

from real_shapes import run


def test_gemma4_e2b_shapes_serve_at_tp4(tmp_path):
    result = run("gemma4-e2b", 4, warmup=False, workdir=tmp_path)
    assert result["ok"], result["tail"]
    assert result["tokens"] == [8, 8]
    assert "window-aware KV cache: 1 full, 1 sliding, 2 KV-shared" in result["kv_layout"], result["kv_layout"]
