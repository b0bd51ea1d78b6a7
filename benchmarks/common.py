"""Shared by the benchmarks: medians, the machine line printed with every table, table printing."""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import time


def median(values) -> float:
    values = list(values)
    return statistics.median(values) if values else float("nan")


def alternating(variants: dict, reps: int) -> dict:
    """Median seconds of each variant's callable, run in turns `reps` times after one untimed turn
    (which compiles), so that load on the machine hits every variant alike."""
    times = {name: [] for name in variants}
    for rep in range(reps + 1):
        for name, run in variants.items():
            start = time.perf_counter()
            run()
            if rep:
                times[name].append(time.perf_counter() - start)
    return {name: median(values) for name, values in times.items()}


def machine() -> str:
    """CPU model, cores and RAM, plus today's date: the heading of every table."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    ram_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
    return f"{datetime.date.today()}, {model}, {os.cpu_count()} cores, {ram_gib:.0f} GiB RAM"


def table(headers: list[str], rows: list[list]) -> str:
    """A GitHub-markdown table, so the output pastes into the README as is."""
    cells = [[str(c) for c in row] for row in rows]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(lines)


def fmt(value: float, digits: int = 3) -> str:
    """Three significant figures, no exponent for the magnitudes these tables hold."""
    if value != value:  # nan
        return "-"
    if value == 0:
        return "0"
    magnitude = abs(value)
    decimals = max(0, digits - 1 - int(f"{magnitude:e}".split("e")[1]))
    return f"{value:.{decimals}f}"
