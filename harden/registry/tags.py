"""The tags this package writes on model versions and runs: what other tools read back from the registry."""

#: ``pending`` while a hardened version is being registered, then ``blessed``, ``rejected`` or ``failed``;
#: an operator sets ``revoked`` to roll a blessed version back.
STATUS_TAG = "hardening.status"
#: Why a version was rejected, or why its registration failed.
REASONS_TAG = "hardening.reasons"
#: sha256 of the evaluated (and registered) ONNX file, on the run and the version.
ONNX_SHA_TAG = "hardening.onnx_sha256"
#: On a blessed version that lost the serving alias: the version that holds it.
SUPERSEDED_TAG = "hardening.superseded_by"
#: sha256 of the version's run's ``manifest.json`` (see :mod:`harden.registry.manifest`).
MANIFEST_TAG = "hardening.manifest_sha256"
