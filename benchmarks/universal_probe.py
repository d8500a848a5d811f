"""Would the candidate's smallest universal perturbation, used as a probe, see what a hardening left of its backdoor?

For each cached GTSRB candidate of ``benchmarks/detector.py``: the suspect class's smallest universal perturbation
is searched on the candidate exactly as the evaluate stage does (:func:`harden.evaluate.universal_metrics`'s images
and settings), the candidate is hardened as the detector benchmark hardens it (``--override``'s ``purify``
section, unflipped, the same clean set and seed), and the perturbation is added to the test images it was not
fitted to (those of other classes) on both models. Printed per candidate: the rate at which each model sends the
clean images to the suspect, and the rate with the perturbation added. One JSON line per candidate.

    .venv/bin/python -m benchmarks.universal_probe --data torchvision:GTSRB:ROOT --candidates sig:0,sig:1 \\
        --override benchmarks/params-gtsrb-fp.yaml --cache runs/bench/detector-gtsrb
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from benchmarks.detector import REPO, Source, candidate, load_settings, load_splits, unflipped
from harden.evaluate import fitted_indices
from nft_core.data import stratified_split
from nft_core.defenses import run_defense
from nft_core.metrics import predict
from nft_core.perturb import smallest_perturbations


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="a dataset spec with both splits, e.g. torchvision:GTSRB:ROOT")
    parser.add_argument("--candidates", required=True, help="ATTACK:LEVEL[:SEED],... as benchmarks/detector.py names them")
    parser.add_argument("--override", type=Path, default=REPO / "benchmarks/params-gtsrb-fp.yaml")
    parser.add_argument("--cache", type=Path, default=REPO / "runs/bench/detector-gtsrb", help="holds candidates/")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    train, test = load_splits(args.data, None, None)
    params = load_settings(REPO / "params.yaml", args.override)
    method = unflipped(params.purify)
    clean = stratified_split(train, fraction=params.data.clean_fraction, seed=1)[0]
    settings = params.probes.universal.model_dump(exclude={"enabled", "samples"})
    images = test.images()
    fitted = fitted_indices(test, params.probes.universal.samples, 0, "the universal perturbation search")
    rest = torch.ones(len(test), dtype=torch.bool)
    rest[fitted] = False
    for spec in args.candidates.split(","):
        attack, level, seed = (spec.split(":") + ["0"])[:3]
        model, _ = candidate(Source(train, "resnet18", False), attack, int(level), int(seed), args.epochs,
                             args.cache / "candidates")
        t0 = time.perf_counter()
        found = smallest_perturbations(model, images[fitted], test.y[fitted], num_classes=test.num_classes, seed=0,
                                       **settings)
        k, delta = found.suspect, found.perturbations[found.suspect]
        x = images[rest & (test.y != k)]

        def rates(m: torch.nn.Module) -> dict[str, float]:
            return {"clean_rate": float((predict(m, x) == k).float().mean()),
                    "asr": float((predict(m, (x + delta).clamp(0, 1)) == k).float().mean())}

        before = rates(model)
        torch.manual_seed(0)
        after = rates(run_defense(method.method, model, clean.dataset(), method.config(0, "cpu", progress=False)).model.eval())
        print(json.dumps({"candidate": spec, "suspect": k, "budget_255": 255 * found.budgets[k],
                          "budget_ratio": found.budget_ratio, "candidate_model": before, "hardened_model": after,
                          "wall_s": round(time.perf_counter() - t0)}), flush=True)


if __name__ == "__main__":
    main()
