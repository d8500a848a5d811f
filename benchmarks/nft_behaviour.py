"""Behavioural benchmark of NFT on backdoored SmallCNNs trained on the offline synthetic data.

Tables (Markdown on stdout, and in ``--out``):

1. ``attacks``: for every attack, ASR/ACC before and after NFT (paper defaults) and NFT-Adv (a share of each
   batch replaced by untargeted PGD examples with true labels), at 1 %, 2 % and one sample per class.
2. ``placement``: mask placement (norm/weight) x BN mode (train/eval) at 2 % clean data, on some attacks.
3. ``lowdata``: a candidate trained on a few thousand images (it overfits): NFT vs NFT-Adv.
4. ``schedule``: the mask lower bound mu(l) for NFT-Adv at 2 % clean data: the paper's exponential schedule
   (alpha 0.8, beta 0.5), a steeper one (beta 1.0), and none (masks clipped to [0, 1] only).

Backdoored candidates are trained once and cached (safetensors) under ``--cache``.

    .venv/bin/python benchmarks/nft_behaviour.py --out runs/bench/nft_behaviour.md
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from nft_core.attacks import make_attack
from nft_core.config import NFTConfig
from nft_core.data import ImageData, make_synthetic, stratified_split
from nft_core.fold import fold_masks
from nft_core.metrics import accuracy, attack_success_rate, predict
from nft_core.models import Normalized, build_model
from nft_core.purify import purify
from nft_core.train import channel_stats, make_backdoored_candidate

ALL_ATTACKS = ("badnets", "blend", "sig", "wanet", "trojan", "clean_label")


def candidate(attack_name: str, train: ImageData, cache: Path, epochs: int) -> Normalized:
    """A backdoored SmallCNN for ``attack_name`` trained on ``train`` (cached by attack, size and epochs)."""
    path = cache / f"{attack_name}-n{len(train)}-e{epochs}.safetensors"
    mean, std = channel_stats(train)
    if path.exists():
        model = Normalized(build_model("small_cnn", num_classes=train.num_classes), mean, std)
        model.net.load_state_dict(load_file(str(path)))
        return model.eval()
    t0 = time.perf_counter()
    model, _ = make_backdoored_candidate(train, make_attack(attack_name, target=0), epochs=epochs, mean=mean,
                                         std=std, progress=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(model.net.state_dict(), str(path))
    print(f"  (trained the {attack_name} candidate on {len(train)} images in {time.perf_counter() - t0:.0f}s)", flush=True)
    return model.eval()


def evaluate(model, attack_name: str, test: ImageData) -> tuple[float, float]:
    x_trig, y_true, y_target = make_attack(attack_name, target=0).probe(test)
    return (accuracy(predict(model, test.images()), test.y),
            attack_success_rate(predict(model, x_trig), y_true, y_target))


def cell(model, clean: ImageData, config: NFTConfig, attack_name: str, test: ImageData) -> str:
    result = purify(model, clean.dataset(), config)
    acc, asr = evaluate(fold_masks(result.model), attack_name, test)
    return f"{100 * asr:.1f} / {100 * acc:.1f} ({result.wall_time_s:.0f}s)"


def row(cells: list) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-train", type=int, default=5000, help="training images of the main candidates")
    parser.add_argument("--n-low", type=int, default=2000, help="training images of the low-data candidate")
    parser.add_argument("--n-test", type=int, default=1000)
    parser.add_argument("--train-epochs", type=int, default=8, help="epochs of the candidates' training")
    parser.add_argument("--epochs", type=int, default=100, help="NFT epochs")
    parser.add_argument("--adv-share", type=float, default=1.0, help="PGD share of each batch for NFT-Adv")
    parser.add_argument("--adv-lr", type=float, default=0.05, help="NFT-Adv learning rate (paper: 0.05)")
    parser.add_argument("--adv-lr-min", type=float, default=0.02, help="NFT-Adv cosine floor (authors' code: 0.02)")
    parser.add_argument("--adv-schedule", default="exponential", help="NFT-Adv mask lower bound (paper: exponential)")
    parser.add_argument("--attacks", nargs="+", default=list(ALL_ATTACKS))
    parser.add_argument("--sizes", nargs="+", default=["2%", "1%", "1/class"], help="clean-set sizes for NFT-Adv")
    parser.add_argument("--placement-attacks", nargs="+", default=["badnets", "blend"])
    parser.add_argument("--tables", nargs="+", default=["attacks", "placement", "lowdata", "schedule"])
    parser.add_argument("--cache", type=Path, default=Path("runs/bench/candidates"))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    train = make_synthetic(args.n_train, seed=0, train=True)
    test = make_synthetic(args.n_test, seed=0, train=False)
    nft = NFTConfig(epochs=args.epochs, progress=False)
    adv = nft.replace(adv_share=args.adv_share, lr=args.adv_lr, lr_min=args.adv_lr_min, schedule=args.adv_schedule)
    sizes = {"2%": stratified_split(train, fraction=0.02, seed=1)[0],
             "1%": stratified_split(train, fraction=0.01, seed=1)[0],
             "1/class": stratified_split(train, per_class=1, seed=1)[0]}
    lines = [f"Synthetic shapes, {args.n_train} training / {args.n_test} test images, SmallCNN (w=32) candidates "
             f"trained {args.train_epochs} epochs with 10 % poison (clean-label: 80 % of the target class), target 0; "
             f"NFT {args.epochs} epochs, paper defaults (placement {nft.placement}, BN {nft.bn_mode}); NFT-Adv = "
             f"{int(100 * args.adv_share)} % of each batch replaced by 2-step PGD (eps 8/255) examples with true labels, "
             f"lr {args.adv_lr} cosine to {args.adv_lr_min}, mask lower bound {args.adv_schedule}. "
             f"Cells: ASR / ACC in %, time = purification wall time. torch {torch.__version__}, "
             f"{torch.get_num_threads()} threads."]

    def emit(text: str) -> None:
        print(text, flush=True)
        lines.append(text)

    if "attacks" in args.tables:
        emit("\n### Every attack: NFT vs NFT-Adv by clean-set size\n")
        emit(row(["attack", "before", "NFT 2%", *(f"NFT-Adv {k} ({len(sizes[k])} imgs)" for k in args.sizes)]))
        emit(row(["---"] * (3 + len(args.sizes))))
        for name in args.attacks:
            model = candidate(name, train, args.cache, args.train_epochs)
            acc0, asr0 = evaluate(model, name, test)
            emit(row([name, f"{100 * asr0:.1f} / {100 * acc0:.1f}", cell(model, sizes["2%"], nft, name, test),
                      *(cell(model, sizes[k], adv, name, test) for k in args.sizes)]))

    if "placement" in args.tables:
        emit("\n### Mask placement x BN mode (NFT-Adv, 2 % clean data)\n")
        emit(row(["attack", "norm / BN train", "norm / BN eval", "weight / BN train", "weight / BN eval"]))
        emit(row(["---"] * 5))
        for name in args.placement_attacks:
            model = candidate(name, train, args.cache, args.train_epochs)
            emit(row([name, *(cell(model, sizes["2%"], adv.replace(placement=p, bn_mode=b), name, test)
                              for p in ("norm", "weight") for b in ("train", "eval"))]))

    if "lowdata" in args.tables:
        low = make_synthetic(args.n_low, seed=3, train=True)
        clean = stratified_split(train, per_class=len(sizes["2%"]) // train.num_classes, seed=2)[0]
        emit(f"\n### Low-data regime: candidates trained on {args.n_low} images, {len(clean)} clean images\n")
        emit(row(["attack", "before", "NFT", "NFT-Adv"]))
        emit(row(["---"] * 4))
        for name in args.placement_attacks:
            model = candidate(name, low, args.cache, args.train_epochs)
            acc0, asr0 = evaluate(model, name, test)
            emit(row([name, f"{100 * asr0:.1f} / {100 * acc0:.1f}", cell(model, clean, nft, name, test),
                      cell(model, clean, adv, name, test)]))

    if "schedule" in args.tables:
        emit("\n### Mask lower bound mu(l) (NFT-Adv, 2 % clean data)\n")
        schedules = {"exponential, beta 0.5 (paper)": {}, "exponential, beta 1.0": {"schedule_beta": 1.0},
                     "none ([0, 1])": {"schedule": "none"}}
        emit(row(["attack", "before", *schedules]))
        emit(row(["---"] * (2 + len(schedules))))
        for name in args.attacks:
            model = candidate(name, train, args.cache, args.train_epochs)
            acc0, asr0 = evaluate(model, name, test)
            emit(row([name, f"{100 * asr0:.1f} / {100 * acc0:.1f}",
                      *(cell(model, sizes["2%"], adv.replace(**change), name, test) for change in schedules.values())]))

    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
