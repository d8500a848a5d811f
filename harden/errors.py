"""Error types of the hardening stage, and the CLI exit code of each (the table is printed in the README).

Every failure the stage can foresee maps to one code (see ``harden.cli``); anything else is a bug and exits 1.
"""

from __future__ import annotations


class DataError(ValueError):
    """Data unusable with this model: wrong channels, size or classes, labels out of range, empty clean set."""


class GateRejected(RuntimeError):
    """The gate did not bless the model and ``--strict`` was given."""


#: Exit codes of ``nft-harden``.
EXIT_CODES = {
    0: "success (with --strict: the model was blessed)",
    1: "unexpected error (a bug: please report it with the traceback)",
    2: "params.yaml invalid, or bad command-line usage",
    3: "model package refused: pickle without opt-in, sha256 mismatch, corrupt or truncated weights, key/shape "
       "mismatch, non-finite weights, builder not on the allow-list",
    4: "registry error: model, alias or version missing, registry unreachable after retries, registration failed",
    5: "data error: model and data disagree (channels, size, classes), labels out of range, clean set unusable",
    6: "probe error: target outside the label range, malformed probe file",
    10: "the gate rejected the hardened model (only with --strict)",
}
