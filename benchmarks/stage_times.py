"""Wall time of every hardening stage (``nft-harden run --with-candidate``) for the small CNN and PreActResNet-18.

Each architecture runs the repository's ``params.yaml`` in a fresh temporary directory with its own embedded
sqlite registry, with a few fields changed (printed with the table): the builder of the demo candidate and,
for PreActResNet-18, the training and NFT epochs, so that the CPU finishes in minutes. The stage times come from
the CLI's own "stage wall times" line; the table is Markdown on stdout (and in ``--out``).

    .venv/bin/python benchmarks/stage_times.py --out runs/bench/stage_times.md
"""

from __future__ import annotations

import argparse
import platform
import re
import shlex
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
CLI = Path(sys.executable).with_name("nft-harden")

#: per architecture: changes to params.yaml's ``candidate.demo`` and ``purify`` sections (shortened for a CPU)
PROFILES = {
    "small_cnn": {"demo": {"builder": "small_cnn"}, "purify": {}},
    "preact_resnet18": {"demo": {"builder": "preact_resnet18", "epochs": 1}, "purify": {"epochs": 10}},
}
#: ``--full``: params.yaml's own epochs (for a GPU)
FULL_PROFILES = {name: {"demo": {"builder": name}, "purify": {}} for name in PROFILES}


def time_stages(builder: str, changes: dict, device: str) -> dict[str, float]:
    """Run every stage for one architecture in a temporary directory; returns seconds per stage."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["base"].update(device=device, tracking_uri="sqlite:///mlflow.db")
    params["candidate"]["demo"].update(changes["demo"])
    params["purify"].update(changes["purify"])
    with tempfile.TemporaryDirectory(prefix=f"stage-times-{builder}-") as tmp:
        (Path(tmp) / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        proc = subprocess.run([str(CLI), "run", "--with-candidate", "--no-progress"], cwd=tmp, text=True,
                              capture_output=True, check=False)
    match = re.search(r"stage wall times: (.*) \(total", proc.stdout)
    if proc.returncode != 0 or match is None:
        raise SystemExit(f"{builder}: nft-harden run exited {proc.returncode}\n"
                         f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return {name: float(sec.rstrip("s")) for name, sec in (part.rsplit(" ", 1) for part in match.group(1).split(", "))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--builders", nargs="+", default=list(PROFILES), choices=list(PROFILES))
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    parser.add_argument("--full", action="store_true", help="params.yaml's own training and NFT epochs (GPU)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    profiles = FULL_PROFILES if args.full else PROFILES
    results = {b: time_stages(b, profiles[b], args.device) for b in args.builders}
    stages = list(next(iter(results.values())))
    gpu = torch.cuda.get_device_name() if args.device != "cpu" and torch.cuda.is_available() else "none"
    lines = [f"Command: `.venv/bin/python benchmarks/stage_times.py {shlex.join(sys.argv[1:])}` ({date.today()}, "
             f"{platform.machine()}, {torch.get_num_threads()} torch threads, GPU: {gpu}, torch {torch.__version__}).  ",
             "Changes to params.yaml per architecture: "
             + "; ".join(f"{b}: {profiles[b]}" for b in args.builders) + ".", "",
             "| stage | " + " | ".join(f"{b} (s)" for b in args.builders) + " |",
             "|---|" + "---:|" * len(args.builders)]
    lines += [f"| {s} | " + " | ".join(f"{results[b][s]:.1f}" for b in args.builders) + " |" for s in stages]
    lines.append("| **total** | " + " | ".join(f"{sum(results[b].values()):.1f}" for b in args.builders) + " |")
    lines.append("| **pipeline (pull -> promote)** | " + " | ".join(
        f"{sum(v for k, v in results[b].items() if 'candidate' not in k):.1f}" for b in args.builders) + " |")
    print("\n".join(lines))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
