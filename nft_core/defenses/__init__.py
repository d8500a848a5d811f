"""Backdoor purifiers behind one interface, selectable by name.

``run_defense(name, model, clean_data, config=None, *, checkpoint=None, stale_checkpoint="error", **overrides)``
runs one of :data:`DEFENSES` on a copy of ``model`` (never the caller's) and returns a :class:`DefenseResult`
whose ``model`` is a plain module of the candidate's architecture with the candidate's exact state-dict keys and
shapes (masks and parametrizations folded), so the rest of the pipeline does not care which purifier ran. Every
purifier trains through :func:`nft_core.loop.train_epochs`, so with ``checkpoint`` every one of them resumes a
killed run where its last epoch ended (see :mod:`nft_core.loop` for the files and the fingerprint).

=========  ================================================  =====================================
name       method                                            config
=========  ================================================  =====================================
nft        Neural mask Fine-Tuning (Karim et al., ECCV 2024)  :class:`nft_core.config.NFTConfig`
ft         vanilla fine-tuning of all weights                 :class:`FTConfig`
fp         Fine-Pruning (Liu et al., RAID 2018)               :class:`FPConfig`
anp        Adversarial Neuron Pruning (Wu & Wang, 2021)       :class:`ANPConfig`
ft_sam     fine-tuning with SAM (Zhu et al., ICCV 2023)       :class:`FTSAMConfig`
pbe        Progressive Backdoor Erasing (Mu et al., 2023)     :class:`PBEConfig`
fip        Fisher Information guided Purification (2024)      :class:`FIPConfig`
=========  ================================================  =====================================
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn
from torch.utils.data import Dataset

from nft_core.config import (ANPConfig, DefenseConfig, FIPConfig, FPConfig, FTConfig, FTSAMConfig, NFTConfig,
                             PBEConfig)
from nft_core.defenses import anp, fip, fp, ft, ft_sam, nft, pbe
from nft_core.defenses._common import DefenseResult
from nft_core.defenses.pbe import rank_clean_samples
from nft_core.loop import Checkpoint, StaleCheckpoint, StalePolicy


@dataclass(frozen=True)
class Defense:
    """A registered purifier: its config class and its ``run(model, clean_data, config, checkpoint)`` function."""

    config_class: type[NFTConfig] | type[DefenseConfig]
    run: Callable[[nn.Module, Dataset[Any], Any, Checkpoint | None], DefenseResult]
    summary: str


DEFENSES: dict[str, Defense] = {
    "nft": Defense(NFTConfig, nft.run, "Neural mask Fine-Tuning (masks on neurons, MixUp, folded)"),
    "ft": Defense(FTConfig, ft.run, "vanilla fine-tuning of all weights"),
    "fp": Defense(FPConfig, fp.run, "Fine-Pruning: prune dormant last-stage channels, then fine-tune"),
    "anp": Defense(ANPConfig, anp.run, "Adversarial Neuron Pruning: masks under neuron perturbations, prune"),
    "ft_sam": Defense(FTSAMConfig, ft_sam.run, "fine-tuning with sharpness-aware minimisation"),
    "pbe": Defense(PBEConfig, pbe.run, "adversarial then clean fine-tuning; progressive mode without clean data"),
    "fip": Defense(FIPConfig, fip.run, "fine-tuning with Fisher-information regularisers (fast: singular values)"),
}


def _lookup(name: str) -> Defense:
    if name not in DEFENSES:
        raise ValueError(f"unknown defense {name!r}: must be one of {sorted(DEFENSES)}")
    return DEFENSES[name]


def default_config(name: str) -> Any:
    """The paper-settings config of defense ``name``.

    Raises:
        ValueError: unknown name.
    """
    return _lookup(name).config_class()


def run_defense(name: str, model: nn.Module, clean_data: Dataset[Any], config: Any | None = None, *,
                checkpoint: str | Path | None = None, stale_checkpoint: StalePolicy = "error",
                **overrides: Any) -> DefenseResult:
    """Purify a copy of ``model`` with defense ``name`` on ``clean_data``.

    Args:
        name: a key of :data:`DEFENSES`.
        model: the candidate, taking images in [0, 1]; it is not modified.
        clean_data: ``(image CHW float in [0, 1], label)`` dataset (PBE progressive mode: the training set).
        config: that defense's config; default :func:`default_config`.
        checkpoint: file to write the training state to after every epoch and to resume from if present (a
            multi-phase method adds ``<checkpoint>.<phase>`` files; :func:`nft_core.loop.remove_checkpoint`
            deletes them all).
        stale_checkpoint: what to do with a checkpoint of another candidate, clean set or config: raise
            :class:`~nft_core.loop.StaleCheckpoint` (``"error"``) or discard it and start over (``"restart"``).
        **overrides: fields to change on the config (validated).

    Raises:
        ValueError: unknown name, invalid field value, or bad data.
        TypeError: a config of another defense, or an unknown override field.
        StaleCheckpoint: a checkpoint of something else, with ``stale_checkpoint="error"``.
    """
    defense = _lookup(name)
    config = defense.config_class() if config is None else config
    if not isinstance(config, defense.config_class):
        raise TypeError(f"defense {name!r} takes a {defense.config_class.__name__}, got {type(config).__name__}")
    if overrides:
        config = config.replace(**overrides)
    ckpt = Checkpoint(Path(checkpoint), config, stale_checkpoint) if checkpoint is not None else None
    result = defense.run(model, clean_data, config, ckpt)
    result.model = as_candidate(model, result.model)
    return result


def as_candidate(candidate: nn.Module, purified: nn.Module) -> nn.Module:
    """A fresh copy of ``candidate`` (CPU, eval mode) carrying ``purified``'s weights, loaded strictly: this both
    restores the candidate's state-dict key order and checks keys and shapes are exactly the candidate's.

    Raises:
        RuntimeError: the purified model's keys or shapes differ from the candidate's.
    """
    out = copy.deepcopy(candidate).cpu()
    out.load_state_dict(purified.state_dict(), strict=True)
    return out.eval()


__all__ = ["DEFENSES", "ANPConfig", "Defense", "DefenseResult", "FIPConfig", "FPConfig", "FTConfig", "FTSAMConfig",
           "NFTConfig", "PBEConfig", "StaleCheckpoint", "as_candidate", "default_config", "rank_clean_samples",
           "run_defense"]
