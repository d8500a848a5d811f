"""Kubeflow Pipelines v2 components of the hardening step: one thin, typed wrapper per stage.

``validate_params_op`` validates the ``params.yaml`` text once and writes the resolved parameters as an
artifact; every other component reads that artifact, calls the stage function of :mod:`harden.stages`
with its artifacts' local paths (artifacts are directories laid out as the stages write them), and attaches
metadata to its outputs. No algorithm code lives here. The image defaults to :data:`DEFAULT_IMAGE`; the
pipeline sets the real one per task (``nft-harden pipeline compile --image ...``).
"""

from components.stages import (
    evaluate_op,
    export_op,
    fleet_summary_op,
    fold_op,
    gate_op,
    move_alias_op,
    prepare_data_op,
    pull_op,
    purify_op,
    register_op,
    report_op,
    validate_params_op,
)

__all__ = ["evaluate_op", "export_op", "fleet_summary_op", "fold_op", "gate_op", "move_alias_op", "prepare_data_op", "pull_op",
           "purify_op", "register_op", "report_op", "validate_params_op"]
