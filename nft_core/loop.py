"""The one training loop of NFT and every baseline, with per-epoch checkpoints and exact resume.

:func:`train_epochs` runs epochs of a step function over a :class:`~nft_core.batches.DeviceBatches`. A step
returns its logs as 0-d tensors left on the device; they are summed there and read once per epoch, so the step
loop never waits for the device. A method's training is one or more *phases* (NFT: one; PBE: adversarial then
clean fine-tuning, per round), each one call of :func:`train_epochs`.

Checkpoints. Given a :class:`PhaseCheckpoint`, the loop writes after every epoch, atomically (temporary file,
then ``os.replace``), everything the rest of the phase depends on: the model's state dict (parametrizations
included), every optimiser and scheduler, the CPU (and CUDA) RNG, the batch stream, the history, the epoch and
the wall time so far. A rerun with the same checkpoint resumes after the last written epoch and ends with the
same weights and history as an uninterrupted run; a checkpoint whose phase had finished is loaded and the phase
returns without training. Deterministic work between phases (FP's pruning, FIP's Fisher, PBE's sample ranking)
is simply recomputed by the caller on a rerun.

A checkpoint is bound to what it was made from by :func:`fingerprint` (sha256 of the model state the phase
starts from, the clean images and labels, the config without ``progress``, the phase name and
:data:`CHECKPOINT_FORMAT`): a checkpoint of another candidate, clean set, config or phase is never resumed
(:class:`StaleCheckpoint`, or a logged fresh start with ``stale="restart"``).

Files: a method's first training phase writes exactly the path it is given; a later phase ``p`` writes
``<path>.<p>`` beside it (only PBE has later phases). :func:`checkpoint_files` lists them and
:func:`remove_checkpoint` deletes them all.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
from torch import nn
from torch.utils.data import Dataset
from nft_core.progress import bar as progress_bar

from nft_core.batches import DeviceBatches

log = logging.getLogger(__name__)

#: the layout of a checkpoint (3: one file per phase, optimisers and schedulers as lists, a phase name); part of
#: the fingerprint, so a checkpoint written by a version that saved another layout is never resumed
CHECKPOINT_FORMAT = 3

#: one optimisation step on a batch ``(model, images, labels) -> logs``, as 0-d tensors left on the device
StepFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], Mapping[str, torch.Tensor]]
#: ``(images, labels) -> (images, labels)`` applied to each batch before the step (e.g. PGD examples)
BatchHook = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
#: ``model -> columns`` added to each epoch's history row (e.g. NFT's mask statistics)
EpochHook = Callable[[nn.Module], Mapping[str, float]]
StalePolicy = Literal["error", "restart"]


class Settings(Protocol):
    """A config dataclass of :mod:`nft_core.config`."""

    def to_dict(self) -> dict[str, Any]: ...


class StaleCheckpoint(ValueError):
    """A checkpoint written for another candidate, clean set, config or phase."""


def set_norm_mode(model: nn.Module, bn_mode: str) -> None:
    """Model in eval mode, then BatchNorm layers in train mode when ``bn_mode == "train"``."""
    model.eval()
    if bn_mode == "train":
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.train()


def fingerprint(model: nn.Module, clean_data: Dataset[Any], config: Settings, phase: str = "train") -> str:
    """sha256 binding a checkpoint to its inputs: the model's state (weights and buffers, by name), every clean
    image and label in order, the config's class and fields (without ``progress``, which changes nothing), the
    phase name and :data:`CHECKPOINT_FORMAT`."""
    settings = {k: v for k, v in config.to_dict().items() if k != "progress"}
    header = {**settings, "config_class": type(config).__name__, "phase": phase,
              "checkpoint_format": CHECKPOINT_FORMAT}
    digest = hashlib.sha256(json.dumps(header, sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode() + str(tensor.dtype).encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    tensors = getattr(clean_data, "tensors", None)
    samples = [tensors] if tensors is not None else (clean_data[i] for i in range(len(clean_data)))  # type: ignore[arg-type]
    for sample in samples:
        for part in sample:
            t = torch.as_tensor(part).detach().cpu().contiguous()
            digest.update(str(t.dtype).encode())
            digest.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class PhaseCheckpoint:
    """Where one phase checkpoints (``path``), under which ``phase`` name and ``key`` (its :func:`fingerprint`),
    and what to do with a checkpoint of anything else (``stale``)."""

    path: Path
    phase: str
    key: str
    stale: StalePolicy = "error"


@dataclass(frozen=True)
class Checkpoint:
    """A method's checkpoint: the file of its first phase (``path``), the config binding every phase, and what
    to do with a stale checkpoint (``stale``: raise :class:`StaleCheckpoint`, or ``"restart"``)."""

    path: Path
    config: Settings
    stale: StalePolicy = "error"

    def phase(self, name: str, start: nn.Module, data: Dataset[Any], *, own_file: bool = False) -> PhaseCheckpoint:
        """The checkpoint of phase ``name``, bound to the model state it starts from (``start``, or anything that
        state is a deterministic function of, like NFT's candidate before its masks of 1 are attached) and its
        clean ``data``. Call it right before the phase: ``start`` is hashed now. ``own_file``: a later phase,
        written to ``<path>.<name>``."""
        path = self.path.with_name(f"{self.path.name}.{name}") if own_file else self.path
        return PhaseCheckpoint(path, name, fingerprint(start, data, self.config, name), self.stale)


def checkpoint_files(path: str | Path) -> list[Path]:
    """The files a method checkpointing to ``path`` may have left: ``path`` and its later phases' ``<path>.*``
    (temporary files of an interrupted write included), those that exist."""
    path = Path(path)
    found = [path] if path.exists() else []
    return found + sorted(p for p in path.parent.glob(f"{path.name}.*") if p.is_file())


def remove_checkpoint(path: str | Path) -> None:
    """Delete every file of :func:`checkpoint_files` (once a method's result is safely stored)."""
    for p in checkpoint_files(path):
        p.unlink(missing_ok=True)


@dataclass
class Trained:
    """What :func:`train_epochs` returns: per-epoch ``history``, ``wall_time_s`` spent training (all runs of a
    resumed phase added up) and ``resumed_at`` (epochs restored from a checkpoint; 0 for a fresh start)."""

    history: list[dict[str, float]]
    wall_time_s: float
    resumed_at: int


def _atomic_save(obj: dict[str, Any], path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _load(checkpoint: PhaseCheckpoint) -> dict[str, Any] | None:
    """The checkpoint's state if it exists and matches ``checkpoint.key``; None for a fresh start."""
    if not checkpoint.path.exists():
        return None
    # on the CPU: RNG states must be CPU byte tensors; the model and optimisers copy theirs to their device
    state: dict[str, Any] = torch.load(checkpoint.path, map_location="cpu", weights_only=True)
    if state.get("fingerprint") == checkpoint.key:
        return state
    message = (f"checkpoint {checkpoint.path} was written for another candidate, clean set or config "
               f"(fingerprint {str(state.get('fingerprint'))[:12]}, this run's phase {checkpoint.phase!r} "
               f"{checkpoint.key[:12]})")
    if checkpoint.stale == "error":
        raise StaleCheckpoint(f"{message}; delete it to start over")
    log.warning("%s; not resuming it, starting over", message)
    return None


def train_epochs(model: nn.Module, batches: DeviceBatches, step: StepFn, epochs: int, *,
                 optimizers: Sequence[torch.optim.Optimizer] = (),
                 schedulers: Sequence[torch.optim.lr_scheduler.LRScheduler] = (),
                 bn_mode: str = "train", desc: str = "train", progress: bool = True,
                 batch_hook: BatchHook | None = None, epoch_hook: EpochHook | None = None,
                 checkpoint: PhaseCheckpoint | None = None) -> Trained:
    """``epochs`` passes of ``step`` over ``batches``, training ``model`` in place; ends in eval mode.

    Each epoch: BN mode set (:func:`set_norm_mode`), then per batch ``batch_hook`` (BN mode set again after it),
    ``step``, and one step of every scheduler. The epoch's history row is ``epoch`` (1-based), the mean of every
    step log, ``lr`` (the first scheduler's, if any), then ``epoch_hook(model)``'s columns.

    Args:
        optimizers / schedulers: everything the step updates that carries state; saved in the checkpoint.
        checkpoint: write the state after every epoch and resume from it (see module docstring); the
            optimisers, schedulers and ``batches`` must be freshly made, exactly as on the first run.

    Raises:
        FloatingPointError: a non-finite log at some epoch (named).
        StaleCheckpoint: the checkpoint belongs to something else, with ``stale="error"``.
    """
    device = batches.device
    history: list[dict[str, float]] = []
    start, previous = 0, 0.0
    state = _load(checkpoint) if checkpoint is not None else None
    if checkpoint is not None and state is not None:
        model.load_state_dict(state["model"])
        for opt, opt_state in zip(optimizers, state["optimizers"], strict=True):
            opt.load_state_dict(opt_state)
        for sched, sched_state in zip(schedulers, state["schedulers"], strict=True):
            sched.load_state_dict(sched_state)
        torch.set_rng_state(state["rng_cpu"])
        if device.type == "cuda" and state.get("rng_cuda") is not None:
            torch.cuda.set_rng_state(state["rng_cuda"], device)
        batches.load_state_dict(state["batches"])
        history, start, previous = state["history"], state["epoch"], state["wall_time_s"]
        log.info("%s: resumed from %s at epoch %d/%d", desc, checkpoint.path, start, epochs)

    t0 = time.perf_counter()
    bar = progress_bar(range(start, epochs), desc=desc, unit="epoch", disable=not progress, initial=start, total=epochs)
    for epoch in bar:
        set_norm_mode(model, bn_mode)
        sums: dict[str, torch.Tensor] = {}
        for x, y in batches:
            if batch_hook is not None:
                x, y = batch_hook(x, y)
                set_norm_mode(model, bn_mode)
            for k, v in step(model, x, y).items():
                sums[k] = sums[k] + v if k in sums else v.detach().float().clone()
            for sched in schedulers:
                sched.step()
        means = (torch.stack(list(sums.values())) / len(batches)).tolist() if sums else []
        row: dict[str, float] = {"epoch": epoch + 1, **dict(zip(sums, means, strict=True))}
        if schedulers:
            row["lr"] = float(schedulers[0].get_last_lr()[0])
        if epoch_hook is not None:
            row.update(epoch_hook(model))
        bad = {k: v for k, v in row.items() if not math.isfinite(v)}
        if bad:
            raise FloatingPointError(f"{desc}: {bad} became non-finite at epoch {epoch + 1}; lower the learning rate")
        history.append(row)
        bar.set_postfix({k: f"{v:.3g}" for k, v in row.items() if k != "epoch"}, refresh=False)
        if checkpoint is not None:
            _atomic_save({"format": CHECKPOINT_FORMAT, "phase": checkpoint.phase, "fingerprint": checkpoint.key,
                          "epoch": epoch + 1, "epochs": epochs, "model": model.state_dict(),
                          "optimizers": [o.state_dict() for o in optimizers],
                          "schedulers": [s.state_dict() for s in schedulers],
                          "rng_cpu": torch.get_rng_state(),
                          "rng_cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                          "batches": batches.state_dict(), "history": history,
                          "wall_time_s": previous + time.perf_counter() - t0}, checkpoint.path)
    model.eval()
    return Trained(history, previous + time.perf_counter() - t0, start)
