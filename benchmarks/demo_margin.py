"""How far the demo's gate checks pass (or fail), over seeds and thread counts.

The demo must bless its own model on any machine, so every gate check should pass with room to spare. This
runs the whole chain in-process (``nft-harden run --with-candidate``, the stages the demo's pipeline runs) for
each seed and torch thread count, each in a fresh temporary directory with its own sqlite registry, and prints
each check's margin: how far the value lies inside its threshold, in points (percent), negative when it fails.

    .venv/bin/python benchmarks/demo_margin.py --seeds 0,1,2 --threads 1,2
"""

from __future__ import annotations

import argparse
import copy
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from harden.gate import Blessing, CheckResult
from harden.records import PurifyRecord

REPO = Path(__file__).resolve().parents[1]


def margin(check: CheckResult) -> float | None:
    """Distance of a check's value inside its threshold, in points; None for facts."""
    value, threshold, kind = check.value, check.threshold, check.kind
    if kind in ("fact", "probes") or not isinstance(value, float) or not isinstance(threshold, float):
        return None
    if kind == "max":
        return 100 * (threshold - value)
    if kind == "min":
        return 100 * (value - threshold)
    assert check.baseline is not None  # change thresholds always carry the candidate's value
    change = value - check.baseline
    return 100 * (threshold + change if kind == "max_drop" else threshold - change)


def run_once(params: dict, seed: int, threads: int) -> tuple[Blessing, PurifyRecord, float]:
    with tempfile.TemporaryDirectory(prefix="demo-margin-") as tmp:
        work = Path(tmp)
        p = copy.deepcopy(params)
        p["base"]["seed"] = seed
        p["base"]["tracking_uri"] = f"sqlite:///{work / 'mlflow.db'}"
        (work / "params.yaml").write_text(yaml.safe_dump(p))
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        t0 = time.perf_counter()
        proc = subprocess.run([str(Path(sys.executable).with_name("nft-harden")), "run", "--with-candidate",
                               "--no-progress", "--params", str(work / "params.yaml"), "--runs", str(work / "runs"),
                               "--data", str(work / "data")], cwd=work, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise RuntimeError(f"seed {seed}, {threads} threads: exit {proc.returncode}\n{proc.stderr[-2000:]}")
        blessing = Blessing.model_validate_json((work / "runs" / "gate" / "blessing.json").read_text())
        return blessing, PurifyRecord.model_validate_json((work / "runs" / "purify" / "purify.json").read_text()), wall


def attempts_cell(record: PurifyRecord) -> str:
    """Each policy attempt in a few words with its held-out clean accuracy and worst probe ASR lift (%), and the
    held-out checks it failed."""
    cells = []
    for a in record.attempts:
        acc = a.holdout.get("acc")
        lifts = [v for k, v in a.holdout.items() if k.startswith("asr_lift/")]
        scores = f" {100 * acc:.1f} / {100 * max(lifts):.1f}" if acc is not None and lifts else ""
        failed = f" (failed: {'; '.join(a.failed)})" if a.failed else ""
        cells.append(a.word + scores + failed)
    return "; ".join(cells) or "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=REPO / "params.yaml")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--threads", default="1,2")
    args = parser.parse_args()
    params = yaml.safe_load(args.params.read_text())
    rows, worst = [], float("inf")
    for seed in map(int, args.seeds.split(",")):
        for threads in map(int, args.threads.split(",")):
            blessing, record, wall = run_once(params, seed, threads)
            margins = {c.name: m for c in blessing.checks if (m := margin(c)) is not None}
            worst = min([worst, *margins.values()])
            cells = ", ".join(f"{name} {m:+.2f}" for name, m in margins.items())
            verdict = "BLESSED" if blessing.blessed else "REJECTED"
            rows.append(f"| {seed} | {threads} | {verdict} | {cells} | {attempts_cell(record)} | {wall:.0f} |")
            print(rows[-1], flush=True)
    print("\n| seed | threads | verdict | margin per check (points) | attempts (held-out ACC / worst ASR lift, %) "
          "| wall (s) |\n|---:|---:|---|---|---|---:|")
    print("\n".join(rows))
    print(f"\nsmallest margin: {worst:+.2f} points")


if __name__ == "__main__":
    main()
