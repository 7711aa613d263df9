"""Run every benchmark and write their tables into docs/benchmarks.md."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import bench_announce
import bench_categories
import bench_freshness
import bench_ingest
import bench_learning
import bench_order
import bench_pipeline
import bench_prediction_log
import bench_quantize
import bench_restart
import bench_scale_out
import bench_serving
import bench_serving_load
import bench_snapshots
import bench_training
from common import DOCS, machine


def main() -> None:
    sections = [
        *bench_training.main(),
        *bench_pipeline.main(),
        *bench_ingest.main(),
        *bench_scale_out.main(),
        *bench_restart.main(),
        *bench_serving.main(),
        *bench_serving_load.main(),
        *bench_announce.main(),
        *bench_prediction_log.main(),
        *bench_quantize.main(),
        *bench_snapshots.main(),
        *bench_learning.main(),
        *bench_categories.main(),
        *bench_order.main(),
        *bench_freshness.main(),
    ]
    header = (
        "# Benchmarks\n\nWritten by `make bench` (bench/run_all.py); numbers from one run on "
        f"{machine()}. Each benchmark's constants are at the top of its file.\n\n"
    )
    DOCS.parent.mkdir(exist_ok=True)
    DOCS.write_text(header + "\n".join(sections))
    print(f"wrote {DOCS}")


if __name__ == "__main__":
    main()
