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
#: The verdict in one line (``blessed: <summary>`` / ``rejected: <reasons>``), on the version and the run. Its
#: leading underscore sorts it before every ``hardening.*`` tag in MLflow's alphabetical tag lists.
VERDICT_TAG = "_hardening.verdict"
#: On the candidate's version: ``NAME/VERSION`` of the latest hardened version registered from it.
HARDENED_AS_TAG = "hardening.hardened_as"
#: MLflow's own tag holding a run's (Markdown) description, shown on the run page.
RUN_NOTE_TAG = "mlflow.note.content"
#: MLflow's tag on a logged model listing the versions registered from it (``[{"name", "version"}]`` as JSON);
#: the logged-model page reads it ("Not registered" without it).
MODEL_VERSIONS_TAG = "mlflow.modelVersions"
