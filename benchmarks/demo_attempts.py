"""Does the policy's held-out judge rank the demo's attempts as the test set does?

The hardening policy judges each attempt on ``policy.holdout`` of the clean set, which the candidate was trained
on. This rebuilds the demo exactly as ``nft-harden run --with-candidate`` does for a seed (the candidate, the
clean set, the held-out split), purifies it with each attempt of ``params.yaml`` (the ``purify`` section, then
each ``policy.fallbacks`` entry) or with variants given as JSON, and prints each one's clean-accuracy drop and
BadNets ASR on the test set, on the held-out images and on the images it was purified on. The test set is what
the gate sees; the held-out images are what the policy sees when it chooses.

    .venv/bin/python benchmarks/demo_attempts.py --seeds 0,1,2
    .venv/bin/python benchmarks/demo_attempts.py --seeds 0 --variants '[{"method": "nft", "steps_per_epoch": 1}]'
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path
from typing import Any

import yaml

from harden.params import PURIFY_VARIANTS, Params
from nft_core.attacks import make_attack
from nft_core.data import ImageData, load_dataset, stratified_split
from nft_core.defenses import run_defense
from nft_core.metrics import accuracy, attack_success_rate, predict
from nft_core.train import make_backdoored_candidate

REPO = Path(__file__).resolve().parents[1]


def scores(model: Any, data: ImageData, attack: Any) -> tuple[float, float]:
    """Clean accuracy and ASR (the candidate's own trigger) of ``model`` on ``data``."""
    x, y_true, y_target = attack.probe(data)
    return accuracy(predict(model, data.images()), data.y), attack_success_rate(predict(model, x), y_true, y_target)


def attempts(p: Params, variants: list[dict[str, Any]] | None) -> list[tuple[str, Any]]:
    """(label, params) of each attempt: ``params.yaml``'s policy order, or ``variants`` of the purify section."""
    if variants is None:
        return [(a.method, a) for a in [p.purify, *p.policy.fallbacks]]
    out = []
    for v in variants:
        fields = p.purify.model_dump() if v["method"] == p.purify.method else {"method": v["method"]}
        fields.update(v)
        out.append((json.dumps(v), PURIFY_VARIANTS[v["method"]].model_validate(fields)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=REPO / "params.yaml")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--variants", type=json.loads, default=None,
                        help="JSON list of purify sections, each the params.yaml purify section with these fields "
                             "changed (same method) or that method's defaults; default: the policy's attempts")
    args = parser.parse_args()
    raw = yaml.safe_load(args.params.read_text())
    rows = []
    for seed in map(int, args.seeds.split(",")):
        r = copy.deepcopy(raw)
        r["base"]["seed"] = seed
        p = Params.model_validate(r)
        train = load_dataset(p.data.train, train=True, download=p.data.download)
        test = load_dataset(p.data.test, train=False, download=p.data.download)
        demo = p.candidate.demo
        c, h, w = (int(n) for n in train.x.shape[1:])
        attack = make_attack(demo.attack, target=demo.target, mode=demo.mode, num_classes=train.num_classes,
                             image_shape=(c, h, w), seed=seed)
        model, _ = make_backdoored_candidate(train, attack, builder=demo.builder, poison_rate=demo.poison_rate,
                                             epochs=demo.epochs, seed=seed, progress=False)
        # the same draws as the prepare-data and purify stages (harden.stages.prepare_data, purify_stage)
        clean, _ = stratified_split(train, fraction=p.data.clean_fraction, per_class=p.data.clean_per_class,
                                    seed=seed)
        purify_set, holdout = stratified_split(clean, fraction=1 - p.policy.holdout, seed=seed)
        parts = {"test": test, "held-out": holdout, "purified on": purify_set}
        before = {name: scores(model, data, attack) for name, data in parts.items()}
        rows.append(f"| {seed} | candidate | " + " | ".join(f"{100 * before[n][0]:.2f}" for n in parts)
                    + f" | {100 * before['test'][1]:.2f} | - |")
        print(rows[-1], flush=True)
        for label, attempt in attempts(p, args.variants):
            t0 = time.perf_counter()
            result = run_defense(attempt.method, model, purify_set.dataset(), attempt.config(seed, p.base.device, False))
            wall = time.perf_counter() - t0
            after = {name: scores(result.model, data, attack) for name, data in parts.items()}
            drops = " | ".join(f"{100 * (before[n][0] - after[n][0]):+.2f}" for n in parts)
            rows.append(f"| {seed} | {label} | {drops} | {100 * after['test'][1]:.2f} | {wall:.0f} |")
            print(rows[-1], flush=True)
    print(f"\n{len(holdout)} held-out images, {len(purify_set)} purified on, {len(test)} test images; "
          "candidate rows: clean accuracy (%), attempt rows: its drop (points)\n")
    print("| seed | attempt | test | held-out | purified on | test ASR (%) | wall (s) |\n|---:|---|---:|---:|---:|---:|---:|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
