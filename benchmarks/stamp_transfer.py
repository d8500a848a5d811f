"""Does a reconstructed trigger mark a backdoor, or is it an adversarial patch any related model obeys?

The gate's ``inverted/asr`` stamps the candidate's reconstructed trigger (Neural Cleanse, its suspect class) on
images and counts how many a model sends to that class. This script reconstructs every class's trigger from a
candidate exactly as the step does and measures each class's stamp on the candidate, on the model the step
shipped (when there is one) and on benign models trained independently on the same images (the cached benign
candidates of ``benchmarks/detector.py``): a backdoor remnant makes the suspect's stamp work far better than an
ordinary class's; an adversarial patch works about as well as every other class's stamp, and on models derived
from the candidate far better than on independent ones.

    # a run of benchmarks/gtsrb_step.py: the step's held-out images (its judge) and the model it shipped
    .venv/bin/python -m benchmarks.stamp_transfer --data /data/gtsrb --step-run runs/bench/gtsrb-step/trojan-s0
    # a detector candidate (ResNet-18, 6 epochs, the higher poisoning rate): 200 test images, as evaluate fits them
    .venv/bin/python -m benchmarks.stamp_transfer --data /data/gtsrb --detector-attack wanet
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from benchmarks.detector import Source, candidate, load_settings, load_splits
from harden.evaluate import invert_trigger
from harden.package import load_package
from harden.records import PurifyRecord
from harden.stages import PACKAGE, read_npz
from nft_core.data import ImageData, stratified_split
from nft_core.invert import Inversion, stamp
from nft_core.metrics import predict

REPO = Path(__file__).resolve().parents[1]


def stamp_rates(model: torch.nn.Module, inversion: Inversion, images: ImageData) -> list[float]:
    """Each class's stamp on ``images`` not of that class: the share ``model`` sends to the class."""
    x, y = images.images(), images.y
    return [float((predict(model, stamp(x[y != k], inversion.masks[k], inversion.patterns[k]), batch_size=512) == k)
                  .float().mean()) for k in range(len(inversion.norms))]


def check_against_step(run: Path, rate: float, stamped: int) -> None:
    """Refuse to go on unless the suspect's stamp works on the shipped model as the step's judge recorded
    (``inverted/asr`` of the chosen attempt in ``purify.json``, to one image): the held-out split and the
    reconstruction above re-derive the step's, and a drift between the two would make this table about another
    stamp."""
    chosen = next(a for a in json.loads((run / "runs/purify" / PurifyRecord.FILE).read_text())["attempts"]
                  if a.get("chosen"))
    recorded = chosen.get("holdout", {}).get("inverted/asr")
    if recorded is None or abs(recorded - rate) > 1.5 / stamped:
        raise SystemExit(f"the re-derived stamp sends {rate:.4f} of the held-out images to the suspect on the shipped "
                         f"model; the step recorded {recorded}: not the step's reconstruction")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="GTSRB root (torchvision layout)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--step-run", type=Path, help="an --out directory of benchmarks/gtsrb_step.py")
    source.add_argument("--detector-attack", help="a cached candidate of benchmarks/detector.py (ResNet-18, 6 epochs)")
    parser.add_argument("--cache", type=Path, default=REPO / "runs/bench/detector-gtsrb/candidates",
                        help="benchmarks/detector.py's GTSRB candidates (the benign ones, seeds 0-2)")
    parser.add_argument("--images", type=int, default=500,
                        help="with --detector-attack: stamp this many random test images (every class's stamp on "
                             "every model costs a forward pass each)")
    parser.add_argument("--classes", default="", help="comma-separated classes whose stamps get a column too "
                        "(the real target, when the reconstruction's suspect is another class)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    train, test = load_splits(f"torchvision:GTSRB:{Path(args.data).resolve()}", None, None)
    src = Source(train, "resnet18", False)
    models: dict[str, torch.nn.Module] = {}
    if args.step_run:
        run = args.step_run
        params = load_settings(run / "params.yaml", None)
        holdout = stratified_split(read_npz(run / "data/clean.npz"), fraction=1 - params.policy.holdout,
                                   seed=params.base.seed)[1]
        for name, pkg in (("candidate", run / "supplied"), ("shipped by the step", run / "runs/fold" / PACKAGE)):
            net, spec = load_package(pkg)
            models[name] = spec.wrap(net).eval()
        settings = params.probes.inversion.model_dump(exclude={"enabled", "samples"})
        inversion = invert_trigger(models["candidate"], holdout, samples=len(holdout), seed=params.base.seed,
                                   **settings).inversion
        images, where = holdout, f"the step's {len(holdout)} held-out images"
    else:
        params = load_settings(REPO / "params.yaml", None)
        models["candidate"] = candidate(src, args.detector_attack, 1, 0, 6, args.cache)[0]
        fitted = invert_trigger(models["candidate"], test, seed=0,
                                **params.probes.inversion.model_dump(exclude={"enabled"}))
        inversion = fitted.inversion
        keep = torch.ones(len(test), dtype=torch.bool)
        keep[fitted.fitted] = False
        rest = keep.nonzero().flatten()
        rest = rest[torch.randperm(len(rest), generator=torch.Generator().manual_seed(0))[:args.images]]
        images, where = test.subset(rest), f"{len(rest)} random test images it was not fitted to"
    for seed in (0, 1, 2):
        models[f"benign s{seed}"] = candidate(src, "none", 0, seed, 6, args.cache)[0]
    suspect = inversion.suspect
    print(f"the candidate's reconstruction: suspect class {suspect}, anomaly index {inversion.anomaly_index:.2f}, "
          f"mask {inversion.norms[suspect]:.1f} px (median class {statistics.median(inversion.norms):.1f}); "
          f"stamped on {where}\n")
    extra = [int(k) for k in args.classes.split(",") if k]
    print("| model | suspect's stamp | other classes' stamps: median | max |"
          + "".join(f" class {k}'s stamp ({inversion.norms[k]:.1f} px) |" for k in extra)
          + "\n|---|---:|---:|---:|" + "---:|" * len(extra))
    for name, model in models.items():
        rates = stamp_rates(model, inversion, images)
        if args.step_run and name == "shipped by the step":
            check_against_step(args.step_run, rates[suspect], int((images.y != suspect).sum()))
        others = [r for k, r in enumerate(rates) if k != suspect]
        print(f"| {name} | {100 * rates[suspect]:.1f} % | {100 * statistics.median(others):.1f} % | "
              f"{100 * max(others):.1f} % |" + "".join(f" {100 * rates[k]:.1f} % |" for k in extra), flush=True)


if __name__ == "__main__":
    main()
