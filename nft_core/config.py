"""Typed, frozen configuration of Neural mask Fine-Tuning. Defaults are the paper's (ECCV 2024, Sec. 4-5 and
supplementary Sec. 2.2 / Table 18); where the paper is silent, the authors' released code."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

Placement = Literal["norm", "weight"]
BNMode = Literal["train", "eval"]
ScheduleKind = Literal["exponential", "cosine", "logarithmic", "cubic", "linear", "none"]
MixKind = Literal["mixup", "cutmix", "none"]
LRSchedule = Literal["cosine", "constant"]


@dataclass(frozen=True)
class NFTConfig:
    # --- where masks go -------------------------------------------------------------------------------
    placement: Placement = "norm"  # "norm": per-channel scale of BN/LN/GN (authors' code); "weight": rows of Conv/Linear weights (paper Eq. 8)
    skip_first: bool = True  # leave the first maskable layer (in forward order) unmasked, as the paper does
    bn_mode: BNMode = "train"  # "train": BN running statistics follow the clean batches (authors' code); "eval": frozen statistics

    # --- optimisation ---------------------------------------------------------------------------------
    epochs: int = 100  # epochs of training (checkpoint and progress granularity)
    steps_per_epoch: int | None = None  # None: an epoch is one pass over the clean set; N: N batches drawn with replacement (authors' code: 5 x 200)
    batch_size: int = 128  # clean samples per step
    lr: float = 0.05  # SGD learning rate for the masks
    momentum: float = 0.95  # SGD momentum (main text: 0.95)
    lr_schedule: LRSchedule = "cosine"  # per-step cosine decay from lr to lr_min, or a constant lr
    lr_min: float = 0.02  # floor of the cosine schedule (authors' code)

    # --- mask lower bound mu(l), applied by clipping after every optimiser step ------------------------
    schedule: ScheduleKind = "exponential"  # shape of mu(l); "none" clips to [0, 1] only
    schedule_alpha: float = 0.8  # mu(1) scale, in (0, 1] (paper's best: 0.8)
    schedule_beta: float = 0.5  # decay rate of the exponential schedule, >= 0 (paper's best: 0.5)

    # --- objective ------------------------------------------------------------------------------------
    eta_c: float = 5e-4  # regulariser weight per class-normalised sample: eta = eta_c / N_s (Table 18)
    mix: MixKind = "mixup"  # batch mixing: MixUp (paper), CutMix (supplementary Sec. 3.4) or none
    mix_alpha: float = 1.0  # lambda ~ Beta(mix_alpha, mix_alpha)
    crop_flip: bool = True  # RandomCrop(size, padding=4) + horizontal flip per sample, before mixing
    flip: bool = True  # the horizontal flip of crop_flip; off for classes that are not mirror-symmetric (road signs)
    adv_share: float = 0.0  # share of each batch replaced by untargeted PGD examples with true labels (NFT-Adv)
    adv_eps: float = 8 / 255  # L-inf radius of those PGD examples, in [0, 1] pixel units
    adv_steps: int = 2  # PGD steps (supplementary: 2-step L-inf PGD); step size is 2.5 * eps / steps

    # --- runtime --------------------------------------------------------------------------------------
    seed: int = 0  # seeds masks' data order, augmentation, MixUp lambdas and PGD starts
    device: str = "auto"  # "auto" (CUDA when present), "cpu", "cuda", "cuda:1", ...
    amp: bool = True  # bfloat16 autocast on CUDA; ignored on CPU
    progress: bool = True  # show a progress bar

    def __post_init__(self) -> None:
        _check(self)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def replace(self, **changes: Any) -> NFTConfig:
        """A copy with some fields changed (validated like a new config)."""
        return NFTConfig(**{**asdict(self), **changes})


def _choices(name: str) -> tuple[str, ...]:
    return {f.name: f.type for f in fields(NFTConfig)}[name].__args__  # type: ignore[union-attr]


def _check(c: NFTConfig) -> None:
    def bad(name: str, allowed: str) -> ValueError:
        return ValueError(f"NFTConfig.{name}={getattr(c, name)!r} is invalid: must be {allowed}")

    for name, literal in (("placement", Placement), ("bn_mode", BNMode), ("schedule", ScheduleKind),
                          ("mix", MixKind), ("lr_schedule", LRSchedule)):
        if getattr(c, name) not in literal.__args__:
            raise bad(name, f"one of {literal.__args__}")
    positive_ints = ("epochs", "batch_size")
    for name in positive_ints:
        if not isinstance(getattr(c, name), int) or getattr(c, name) < 1:
            raise bad(name, "an integer >= 1")
    if not isinstance(c.adv_steps, int) or c.adv_steps < 1:
        raise bad("adv_steps", "an integer >= 1")
    if c.steps_per_epoch is not None and (not isinstance(c.steps_per_epoch, int) or isinstance(c.steps_per_epoch, bool)
                                          or c.steps_per_epoch < 1):
        raise bad("steps_per_epoch", "null or an integer >= 1")
    checks = {
        "lr": (lambda v: v > 0, "> 0"),
        "momentum": (lambda v: 0 <= v < 1, "in [0, 1)"),
        "lr_min": (lambda v: 0 <= v <= c.lr, f"in [0, lr={c.lr}]"),
        "schedule_alpha": (lambda v: 0 < v <= 1, "in (0, 1]"),
        "schedule_beta": (lambda v: v >= 0, ">= 0"),
        "eta_c": (lambda v: v >= 0, ">= 0"),
        "mix_alpha": (lambda v: v > 0, "> 0"),
        "adv_share": (lambda v: 0 <= v <= 1, "in [0, 1]"),
        "adv_eps": (lambda v: 0 < v <= 1, "in (0, 1]"),
    }
    for name, (ok, allowed) in checks.items():
        value = getattr(c, name)
        is_number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if not is_number or not ok(value):
            raise bad(name, f"a finite number {allowed}")
