"""`make bench`: every benchmark, one after another, each printing its own table."""

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
BENCHMARKS = [
    ["attention.py", "--plot", str(HERE / "attention.png")],
]

if __name__ == "__main__":
    for script, *args in BENCHMARKS:
        print(f"\n### {script}", flush=True)
        subprocess.run([sys.executable, str(HERE / script), *args], check=True)
