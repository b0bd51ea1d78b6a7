"""`make bench`: every benchmark, one after another, each printing its own markdown tables.

About 20 minutes on an idle 2-core machine (flops.py about 4 of them, serving_images.py about 4). Every table compares variants measured
side by side in the same run (taking turns, medians), so its ratios hold under load;
absolute times do not.
"""

import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
BENCHMARKS = [
    ["serving.py", "--reps", "2"],                # 1, 2, 3, 6: vLLM ours / built-in / HF, roofline, compiles
    ["serving_images.py", "--reps", "2"],         # image requests: ours / built-in Gemma 4, greedy = HF
    ["in_place_and_logits.py", "--reps", "2"],    # 5: KV copies, deferred logits at a 200k vocabulary
    ["moe.py", "--reps", "3"],                    # routed vs dense MoE dispatch
    ["flops.py"],                                 # model step FLOPs vs ideal, stock vs jaxllm buckets (~4 min)
    ["decode_rows.py", "--reps", "3"],            # decode rows one at a time vs tiles of 8
    ["decode_attention.py", "--reps", "5"],       # decode rows: before vs after issue #16's change
    ["attention.py", "--plot", str(HERE / "attention.png")],  # 4: portable RPA vs context and capacity
    ["kv_capacity.py"],                           # window-aware KV cache vs full length, vLLM's planner
    ["fits.py"],                                  # what fits per TPU slice, weight and KV format (planner only)
]

if __name__ == "__main__":
    for script, *args in BENCHMARKS:
        print(f"\n## {script}", flush=True)
        start = time.perf_counter()
        # Engine and JAX start-up noise goes to stderr; the tables come on stdout.
        subprocess.run([sys.executable, str(HERE / script), *args], check=True)
        print(f"({script}: {time.perf_counter() - start:.0f} s)", flush=True)
