"""Error types of the hardening stage, and the CLI exit code of each (the table is printed in the README).

Every failure the stage can foresee maps to one code (:func:`exit_code`; the CLI, ``pipeline.cli``, exits with
it); anything else is a bug and exits 1.
"""

from __future__ import annotations

from typing import Any


class ParamsError(ValueError):
    """``params.yaml`` is missing, unreadable or invalid; the message names every bad key."""


class PackageError(ValueError):
    """A package cannot be saved, loaded or verified; the message names the file, key and value."""


class RegistryError(RuntimeError):
    """A registry operation failed; the message names the model, alias, version or URI.

    ``state`` (when a registration failed part-way) says what the registry holds as far as is known:
    ``version``, its ``status`` tag, whether the alias moved (``True``/``False``/``"unknown"``) and whether
    that was ``confirmed`` by reading the registry back.
    """

    def __init__(self, message: str, *, state: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.state = state


class DataError(ValueError):
    """Data unusable with this model: wrong channels, size or classes, labels out of range, empty clean set."""


class ProbeError(ValueError):
    """A probe cannot be used with this test set; the message names the probe, file and key."""


class ChainError(RuntimeError):
    """A stage's inputs do not form one chain: an input was made from another candidate, clean or test set,
    params section or upstream output, or a file changed after its stage wrote it (see ``harden.records``)."""


class GateRejected(RuntimeError):
    """The gate did not bless the model and ``--strict`` was given."""


#: Exit codes of ``nft-harden``.
EXIT_CODES = {
    0: "success (with --strict: the model was blessed)",
    1: "unexpected error (a bug: please report it with the traceback)",
    2: "params.yaml invalid (incl. duplicate keys, anchors/aliases, a gate check naming a metric the evaluation "
       "does not produce), or bad command-line usage",
    3: "model package refused: pickle without opt-in, sha256 mismatch, corrupt or truncated weights, key/shape "
       "mismatch, non-finite weights, builder not on the allow-list",
    4: "registry error: model, alias or version missing, registry unreachable after retries, registration failed",
    5: "data error: model and data disagree (channels, size, classes), labels out of range, clean set unusable",
    6: "probe error: target outside the label range, malformed probe file",
    7: "stage outputs do not form one chain: an input was made from another candidate, data set, params section "
       "or upstream output, a record was edited, or a blessing does not follow from its checks (re-run the stages "
       "in order)",
    10: "the gate rejected the hardened model (only with --strict)",
}


#: The exit code of each foreseen failure (anything else exits 1).
ERROR_CODES: tuple[tuple[type[Exception], int], ...] = (
    (ParamsError, 2), (PackageError, 3), (RegistryError, 4), (DataError, 5), (ProbeError, 6), (ChainError, 7),
    (GateRejected, 10))


def exit_code(err: BaseException) -> int | None:
    """The documented exit code of a foreseen failure, None for anything else."""
    return next((code for kind, code in ERROR_CODES if isinstance(err, kind)), None)
