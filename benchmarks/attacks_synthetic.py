"""Backdoored SmallCNN per attack on the offline synthetic data: clean accuracy, ASR and training time.

Usage: ``python -m benchmarks.attacks_synthetic [--n-train 5000] [--epochs 6] [--attacks badnets blend ...]``.
``none`` trains a clean model (its ASR column shows how often a clean model already maps triggered inputs to
the target). Clean-label attacks poison ``--clean-label-rate`` of the training set (0.08 = 80 % of the
target class, the NFT supplementary's setting, with PGD perturbations from a 2-epoch surrogate); the
others ``--rate``.
"""

from __future__ import annotations

import argparse

import torch

from nft_core.attacks import ATTACKS, make_attack
from nft_core.data import make_synthetic
from nft_core.metrics import accuracy, attack_success_rate, predict
from nft_core.models import Normalized, SmallCNN
from nft_core.train import channel_stats, make_backdoored_candidate, train_classifier


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-train", type=int, default=5000)
    parser.add_argument("--n-test", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--rate", type=float, default=0.1)
    parser.add_argument("--clean-label-rate", type=float, default=0.08)
    parser.add_argument("--mode", default="all2one", choices=["all2one", "all2all"])
    parser.add_argument("--attacks", nargs="+", default=["none", *ATTACKS])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    train = make_synthetic(args.n_train, seed=args.seed, train=True)
    test = make_synthetic(args.n_test, seed=args.seed, train=False)
    print(f"torch threads: {torch.get_num_threads()}, train {len(train)}, test {len(test)}, epochs {args.epochs}",
          flush=True)
    print("| attack | mode | poison rate | clean ACC | ASR | train time (s) |\n|---|---|---|---|---|---|", flush=True)
    for name in args.attacks:
        if name == "none":
            mean, std = channel_stats(train)
            torch.manual_seed(args.seed)
            model = Normalized(SmallCNN(num_classes=10), mean, std)
            history = train_classifier(model, train, epochs=args.epochs, seed=args.seed, progress=False)
            probe_attack, rate, wall = make_attack("badnets", mode=args.mode), 0.0, sum(h["time_s"] for h in history)
        else:
            probe_attack = make_attack(name, mode=args.mode, seed=args.seed)
            rate = args.clean_label_rate if probe_attack.clean_label else args.rate
            model, info = make_backdoored_candidate(train, probe_attack, poison_rate=rate, epochs=args.epochs,
                                                    seed=args.seed, progress=False)
            wall = info["wall_time_s"]
        acc = accuracy(predict(model, test.images()), test.y)
        x_bd, y_true, y_target = probe_attack.probe(test)
        asr = attack_success_rate(predict(model, x_bd), y_true, y_target)
        print(f"| {name} | {probe_attack.mode} | {rate:.2f} | {100 * acc:.2f} | {100 * asr:.2f} | {wall:.1f} |",
              flush=True)


if __name__ == "__main__":
    main()
