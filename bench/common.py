"""Helpers shared by the benchmarks: timing, percentiles and markdown tables."""

import os
import platform
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

DOCS = Path(__file__).parents[1] / "docs" / "benchmarks.md"


def machine() -> str:
    return (
        f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"torch {torch.__version__}, {time.strftime('%Y-%m-%d')}"
    )


def percentiles(samples_s: Sequence[float]) -> tuple[float, float, float]:
    """p50, p95 and p99 in milliseconds."""
    p50, p95, p99 = np.percentile(np.asarray(samples_s) * 1000, [50, 95, 99])
    return float(p50), float(p95), float(p99)


def table(title: str, header: Sequence[str], rows: Sequence[Sequence[object]], note: str = "") -> str:
    lines = [f"## {title}", ""]
    if note:
        lines += [note, ""]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    text = "\n".join(lines) + "\n"
    print(text, flush=True)
    return text
