"""The hardening step end to end on a real model: a GTSRB candidate of ``benchmarks/gtsrb.py`` through ``nft-harden run``.

What the other GTSRB benchmarks do not show: the step as a user runs it, on a real backdoored model, judging its
policy's attempts the only way it can (clean images held out of purification, the probes, the trigger it
reconstructs, the trigger-free score), never with the real trigger. This script

1. packages one cached candidate of ``benchmarks/gtsrb.py`` or ``benchmarks/detector.py`` (``--cache``,
   ``--candidate KEY``; the detector's cache also holds benign models, ``attack: none``) and registers it in a fresh
   sqlite MLflow registry under ``--out``, as a supplier would hand it over;
2. writes a ``params.yaml`` there: ``--params`` with ``--override``'s sections in place of its own (as
   ``benchmarks/detector.py`` does), the registry, the candidate and the data (``--data``, both splits, and
   ``--clean-fraction`` of the training images) set, and runs ``nft-harden run`` on it in a subprocess, as a user
   would (every stage: prepare ... promote);
3. then scores the shipped model (the folded package the step exported and registered) and the candidate on the
   12,630 test images with the candidate's real trigger, which the step never saw (a benign candidate has none:
   accuracy only), and prints what each attempt was judged by, the gate's verdict and the real trigger's ASR
   before and after.

    .venv/bin/python -m benchmarks.gtsrb_step --data /data/gtsrb --candidate 10484df96d131667a5d7 \\
        --override benchmarks/params-gtsrb-fp-ftsam.yaml --out runs/bench/gtsrb-step/trojan-s0

Each run starts from an empty ``--out`` (refused if it holds anything), so the registry, the stage outputs and the
printed table belong to this one run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml
from safetensors.torch import load_file

from benchmarks.detector import ARCHS as DETECTOR_ARCHS
from benchmarks.detector import load_settings
from benchmarks.gtsrb import attack_for, data_digest, evaluate
from harden.package import InputSpec, ModelSpec, load_package, save_package
from harden.records import Blessing, PurifyRecord
from harden.registry.register import register_candidate
from harden.stages import PACKAGE
from nft_core.data import load_dataset
from nft_core.models import Normalized, build_model
from nft_core.train import channel_stats

REPO = Path(__file__).resolve().parents[1]


def package_candidate(cache: Path, key: str, train_spec: str, out: Path) -> tuple[Normalized, dict[str, Any]]:
    """The cached candidate ``key`` as a package under ``out`` (the normalisation is the training images', as
    ``benchmarks/gtsrb.py`` trained it with), and the model with its record."""
    info = json.loads((cache / f"{key}.json").read_text())
    train = load_dataset(train_spec, train=True)
    if "recipe" in info:  # benchmarks/gtsrb.py
        recipe = info["recipe"]
    else:  # benchmarks/detector.py: every attack all2one, and benign models (attack "none")
        recipe = {"data": info["data"], "builder": DETECTOR_ARCHS[info["arch"]],
                  "kwargs": {"num_classes": train.num_classes}}
        info = info | {"mode": "all2one"}
    if data_digest(train) != recipe["data"]:
        raise SystemExit(f"candidate {key} was trained on other images than {train_spec}'s training split "
                         "(its normalisation is theirs): pass the data it was made from")
    mean, std = channel_stats(train)
    channels, height, width = train.x.shape[1:]
    net = build_model(recipe["builder"], **recipe["kwargs"])
    net.load_state_dict(load_file(str(cache / f"{key}.safetensors")))
    spec = ModelSpec(builder=recipe["builder"], kwargs=recipe["kwargs"], num_classes=recipe["kwargs"]["num_classes"],
                     input=InputSpec(channels=channels, height=height, width=width, mean=mean, std=std))
    save_package(net, spec, out)
    return Normalized(net, mean, std).eval(), info


def step_params(args: argparse.Namespace, tracking_uri: str, model_name: str) -> dict[str, Any]:
    """``--params`` with ``--override``'s sections, pointed at this run's registry, candidate and data."""
    params = load_settings(args.params, args.override).model_dump(mode="json")
    params["base"] |= {"tracking_uri": tracking_uri, "device": args.device}
    params["data"] |= {"train": args.data, "test": args.data, "clean_fraction": args.clean_fraction,
                       "clean_per_class": None}
    params["candidate"] |= {"model": f"models:/{model_name}@candidate"}
    params["candidate"]["demo"]["enabled"] = False
    params["promote"] |= {"name": f"{model_name}-hardened"}
    return params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="GTSRB root (torchvision layout), or a torchvision:/npz: spec")
    parser.add_argument("--candidate", required=True, help="the candidate's key in --cache (benchmarks/gtsrb.py)")
    parser.add_argument("--cache", type=Path, default=REPO / "runs/bench/gtsrb")
    parser.add_argument("--params", type=Path, default=REPO / "params.yaml")
    parser.add_argument("--override", type=Path, default=None, help="a YAML file whose sections replace --params's")
    parser.add_argument("--clean-fraction", type=float, default=0.03, help="the paper's GTSRB setting (1,176 images)")
    parser.add_argument("--out", type=Path, required=True, help="an empty or absent directory for this run")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch's intra-op threads in the step")
    args = parser.parse_args()
    if ":" not in args.data:
        args.data = f"torchvision:GTSRB:{Path(args.data).resolve()}"
    out = args.out.resolve()
    if out.exists() and any(out.iterdir()):
        parser.error(f"--out {out} is not empty: every run starts from an empty directory")
    out.mkdir(parents=True, exist_ok=True)

    model, info = package_candidate(args.cache, args.candidate, args.data, out / "supplied")
    name = f"gtsrb-{info['attack']}-{args.candidate[:8]}"
    tracking_uri = f"sqlite:///{out / 'mlflow.db'}"
    register_candidate(out / "supplied", name, tracking_uri=tracking_uri)
    params = step_params(args, tracking_uri, name)
    (out / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    env = os.environ | ({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {})
    cmd = [str(Path(sys.executable).with_name("nft-harden")), "run", "--params", str(out / "params.yaml"),
           "--runs", str(out / "runs"), "--data", str(out / "data"), "--no-progress"]
    print("$", " ".join(cmd), flush=True)
    step = subprocess.run(cmd, cwd=out, env=env, check=False)
    if step.returncode != 0:  # a rejection exits 0 without --strict; anything else left no model to score
        raise SystemExit(f"nft-harden run exited {step.returncode} (its output above): nothing to score")

    test = load_dataset(args.data, train=False)
    benign = info["attack"] == "none"
    # a benign candidate has no trigger: a one-image stand-in probe, and ACC alone is kept
    stand_in = (test.images()[:1], test.y[:1], (test.y[:1] + 1) % test.num_classes)
    probe = stand_in if benign else attack_for(info["attack"], info["mode"]).probe(test)
    before = evaluate(model, test, probe, args.device)
    attempts = json.loads((out / "runs/purify" / PurifyRecord.FILE).read_text())["attempts"]
    blessing = json.loads((out / "runs/gate" / Blessing.FILE).read_text())
    net, spec = load_package(out / "runs/fold" / PACKAGE)
    after = evaluate(spec.wrap(net).eval(), test, probe, args.device)
    if benign:
        before, after = {"acc": before["acc"]}, {"acc": after["acc"]}
    print(f"\ngate: {'BLESSED' if blessing['blessed'] else 'REJECTED'}")
    print("\n| attempt | time (s) | held-out checks failed | chosen |\n|---|---:|---|---|")
    for a in attempts:
        print(f"| {a.get('defense')} | {a.get('wall_time_s') or 0:.0f} | {', '.join(a.get('failed') or []) or '-'} | "
              f"{'yes' if a.get('chosen') else ''} |")
    if benign:
        print(f"\nbenign candidate, test set: ACC {100 * before['acc']:.1f} -> {100 * after['acc']:.1f}")
    else:
        print(f"\nreal {info['attack']} trigger, test set: ACC {100 * before['acc']:.1f} -> {100 * after['acc']:.1f}, "
              f"ASR {100 * before['asr']:.1f} -> {100 * after['asr']:.1f}, RA {100 * before['ra']:.1f} -> "
              f"{100 * after['ra']:.1f}")
    (out / "real_trigger.json").write_text(json.dumps({"candidate": args.candidate, "attack": info["attack"],
                                                       "before": before, "after": after,
                                                       "blessed": blessing["blessed"], "exit": step.returncode},
                                                      indent=1))


if __name__ == "__main__":
    main()
