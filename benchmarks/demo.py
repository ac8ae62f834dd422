"""Wall time and scores of ``beit3cap demo`` (default and --quick), each in a fresh process as a user runs it.

    .venv/bin/python benchmarks/demo.py [--runs default quick] [--repeats 1] [--keep DIR]

Reports per run: total wall time (interpreter start to exit), the training phase, test CIDEr-D, the
image-blind baseline's CIDEr-D and the load average before the run (the machine may be shared). Prints a
table and appends a section to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_section, machine_summary  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TARGETS = {"default": "≤ 300 s, CIDEr-D ≥ 1.5", "quick": "≤ 60 s, CIDEr-D ≥ 0.85 and ≥ blind + 0.2"}


def run_once(kind: str, out: Path) -> dict:
    cmd = [sys.executable, "-m", "beit3cap.cli", "demo", "--out", str(out)] + (["--quick"] if kind == "quick" else [])
    load = os.getloadavg()[0]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    wall = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}")
    summary = json.loads((out / "demo.json").read_text())
    training = next(s for name, s in summary["timings"].items() if name.startswith("training beit3"))
    plan = summary["plan"]
    return {"run": kind, "wall": wall, "training": training, "cider": summary["metrics"]["CIDEr"],
            "blind": summary["blind_metrics"]["CIDEr"], "load": load,
            "steps": plan["epochs"] * (plan["n_train"] * 5 // plan["batch_size"])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="+", default=["default", "quick"], choices=["default", "quick"])
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--keep", default=None, help="write the demo outputs here instead of a temporary folder")
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(args.keep or tmp)
        for r in range(args.repeats):
            for kind in args.runs:
                row = run_once(kind, base / f"{kind}-{r}")
                rows.append(row)
                print(f"{kind}: {row['wall']:.1f} s wall, CIDEr {row['cider']:.3f}, blind {row['blind']:.3f}, "
                      f"load {row['load']:.2f}", flush=True)
    table = ["| run | target | steps | wall (s) | training (s) | test CIDEr-D | blind CIDEr-D | load avg before |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    table += [f"| `beit3cap demo{' --quick' if r['run'] == 'quick' else ''}` | {TARGETS[r['run']]} | {r['steps']} | "
              f"{r['wall']:.1f} | {r['training']:.1f} | {r['cider']:.3f} | {r['blind']:.3f} | {r['load']:.2f} |"
              for r in rows]
    body = "\n".join([machine_summary(), "",
                      "Whole runs in a fresh process (`python -m beit3cap.cli demo`), from interpreter start to "
                      "exit; 100 held-out test images; blind = the same model given one grey image for every "
                      "test image. The plans are deterministic: the same machine gives the same scores. Per-phase "
                      "times and the experiments behind the recipe: the README, section The demo.", "", *table])
    print(body)
    append_section("Demo (beit3cap demo)", body)


if __name__ == "__main__":
    main()
