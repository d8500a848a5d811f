"""The attack probes of ``params.yaml`` (``probes.attacks``), validated without importing torch: the schema
module and ``nft-harden check-params`` stay fast. :mod:`harden.evaluate` applies them."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

#: The trigger names of :data:`nft_core.attacks.ATTACKS` (kept equal by ``tests/test_params.py``).
ATTACK_NAMES: tuple[str, ...] = ("badnets", "blend", "sig", "trojan", "wanet", "clean_label")


class Probe(BaseModel):
    """An attack probe: a named trigger applied to the clean test set, or an npz of triggered inputs.

    The npz holds ``x`` (uint8 N x H x W x C, the dataset convention, or float N x C x H x W in [0, 1]),
    ``y_true`` and ``y_target`` (integer, shape (N,)).

    Attributes:
        name: key of the probe's metrics (``asr/<name>``); default: the attack name or the npz file stem.
        attack: trigger name from :data:`nft_core.attacks.ATTACKS`.
        target: target label (all2one) of the attack.
        mode: ``all2one`` or ``all2all``.
        npz: path of a user-supplied probe file (instead of ``attack``).
        seed: seed of the trigger's random parts.
        options: attack-specific options (``alpha`` for blend, ...), see :func:`nft_core.attacks.make_attack`.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    attack: str | None = None
    target: int = Field(default=0, ge=0)
    mode: Literal["all2one", "all2all"] = "all2one"
    npz: Path | None = None
    seed: int = 0
    options: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _default_name(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and "name" not in data:
            source = data.get("attack") or (Path(data["npz"]).stem if data.get("npz") else None)
            if source is not None:
                return {**data, "name": re.sub(r"[^A-Za-z0-9_.-]", "_", str(source))}
        return data

    @model_validator(mode="after")
    def _one_source(self) -> Probe:
        if (self.attack is None) == (self.npz is None):
            raise ValueError(f"probe {self.name!r}: set exactly one of 'attack' and 'npz'")
        if self.attack is not None and self.attack not in ATTACK_NAMES:
            raise ValueError(f"probe {self.name!r}: attack={self.attack!r} is unknown; use one of {sorted(ATTACK_NAMES)}")
        if self.npz is not None and self.options:
            raise ValueError(f"probe {self.name!r}: options apply to attacks, not to an npz file")
        return self
