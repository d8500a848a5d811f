"""MLflow registry adapter against a real embedded sqlite registry and a real ``mlflow server``."""

import json
import time

import mlflow
import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from harden.gate import evaluate_gate
from harden.integrity import sha256_file
from harden.package import PackageError, load_package
from harden.registry import (
    ONNX_SHA_TAG,
    REASONS_TAG,
    STATUS_TAG,
    SUPERSEDED_TAG,
    RegistryError,
    check_store_exists,
    move_alias,
    parse_model_ref,
    pull,
    register_candidate,
    register_hardened,
    strip_credentials,
)
from pipeline_fixtures import tiny_hardened


@pytest.mark.parametrize("ref,expected", [
    ("models:/resnet@candidate", ("resnet", "candidate", None)),
    ("models:/resnet/3", ("resnet", None, 3)),
    ("resnet@champion", ("resnet", "champion", None)),
    ("resnet/12", ("resnet", None, 12)),
])
def test_parse_model_ref(ref, expected):
    assert parse_model_ref(ref) == expected


@pytest.mark.parametrize("ref", ["resnet", "models:/resnet", "resnet/latest", "a/b/3", "resnet@", ""])
def test_parse_model_ref_rejects(ref):
    with pytest.raises(RegistryError, match=f"bad model reference {ref!r}"):
        parse_model_ref(ref)


def test_strip_credentials():
    assert strip_credentials("https://bob:s3cret@mlflow.example:8443/x") == "https://mlflow.example:8443/x"
    assert strip_credentials("sqlite:////tmp/mlflow.db") == "sqlite:////tmp/mlflow.db"


def test_an_sqlite_registry_without_mlflows_sql_store_is_refused_with_what_to_do(monkeypatch, tmp_path):
    """With MLflow's client only (mlflow-skinny, as in the container image) an sqlite URI gets one clear error
    before MLflow is called; an http URI is unaffected."""
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "sqlalchemy" else real(name, *a))
    with pytest.raises(RegistryError, match=r"needs the full mlflow package .*nft-harden\[local\]"):
        check_store_exists(f"sqlite:///{tmp_path}/mlflow.db", may_create=True)
    with pytest.raises(RegistryError, match="mlflow-skinny"):
        pull("models:/m@candidate", tmp_path / "pulled", tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    check_store_exists("http://127.0.0.1:5000")


def test_pull_by_alias_and_version_with_provenance(registry_uri, model_name, make_package, tmp_path):
    net, _, pkg = make_package()
    _, _, other = make_package(name="other", seed=1)
    v1 = register_candidate(pkg, model_name, tracking_uri=registry_uri)
    v2 = register_candidate(other, model_name, tracking_uri=registry_uri, alias=None)
    assert (v1, v2) == (1, 2)

    prov = pull(f"models:/{model_name}@candidate", tmp_path / "by-alias", tracking_uri=registry_uri)
    assert (prov.model_name, prov.version, prov.aliases) == (model_name, 1, ["candidate"])
    assert prov.run_id and prov.tracking_uri == registry_uri and prov.source_uri
    assert prov.files_sha256 == {"model.json": sha256_file(pkg / "model.json"),
                                 "model.safetensors": sha256_file(pkg / "model.safetensors")}
    on_disk = json.loads((tmp_path / "by-alias" / "provenance.json").read_text())
    assert on_disk["version"] == 1 and on_disk["files_sha256"] == prov.files_sha256
    pulled, _ = load_package(tmp_path / "by-alias" / "package")
    x = torch.rand(3, 3, 32, 32)
    assert torch.equal(pulled(x), net(x))

    prov2 = pull(f"{model_name}/2", tmp_path / "by-version", tracking_uri=registry_uri)
    assert (prov2.version, prov2.aliases) == (2, [])
    assert prov2.files_sha256["model.safetensors"] == sha256_file(other / "model.safetensors")


def test_pull_missing_model_alias_version(registry_uri, model_name, make_package, tmp_path):
    with pytest.raises(RegistryError, match=f"registered model '{model_name}' does not exist"):
        pull(f"{model_name}@candidate", tmp_path / "a", tracking_uri=registry_uri)
    register_candidate(make_package()[2], model_name, tracking_uri=registry_uri)
    with pytest.raises(RegistryError, match=f"'{model_name}' has no alias 'nope'"):
        pull(f"{model_name}@nope", tmp_path / "b", tracking_uri=registry_uri)
    with pytest.raises(RegistryError, match=f"'{model_name}' has no version 7"):
        pull(f"{model_name}/7", tmp_path / "c", tracking_uri=registry_uri)
    assert not (tmp_path / "b" / "package").exists() and not (tmp_path / "c").exists()


def test_pickled_version_refused_without_opt_in(registry_uri, model_name, make_package, malicious_pickle,
                                                 tmp_path):
    _, _, pkg = make_package()
    marker = tmp_path / "pwned"
    (pkg / "model.safetensors").unlink()
    (pkg / "model.pkl").write_bytes(malicious_pickle(marker))
    client = MlflowClient(registry_uri, registry_uri)
    location = (tmp_path / "artifacts").as_uri() if registry_uri.startswith("sqlite") else None
    run = client.create_run(client.create_experiment(f"exp-{model_name}", artifact_location=location))
    client.log_artifacts(run.info.run_id, str(pkg), "model")
    client.create_registered_model(model_name)
    client.create_model_version(model_name, f"{run.info.artifact_uri}/model", run_id=run.info.run_id)
    with pytest.raises(PackageError, match="refusing to unpickle"):
        pull(f"{model_name}/1", tmp_path / "out", tracking_uri=registry_uri)
    assert not marker.exists()
    assert not (tmp_path / "out" / "package").exists() and not (tmp_path / "out" / "provenance.json").exists()


def test_pickled_version_with_opt_in_is_resaved_as_safetensors(sqlite_registry, model_name, make_package,
                                                                tmp_path, caplog):
    net, spec, pkg = make_package()
    (pkg / "model.safetensors").unlink()
    (pkg / "model.json").unlink()
    torch.save(net, pkg / "model.pth")  # what an mlflow.pytorch model holds: a pickled module, no model.json
    client = MlflowClient(sqlite_registry, sqlite_registry)
    run = client.create_run(client.create_experiment(f"exp-{model_name}", artifact_location=tmp_path.as_uri()))
    client.log_artifacts(run.info.run_id, str(pkg), "model")
    client.create_registered_model(model_name)
    client.create_model_version(model_name, f"{run.info.artifact_uri}/model", run_id=run.info.run_id)
    with caplog.at_level("WARNING", logger="harden.package"):
        pull(f"{model_name}/1", tmp_path / "out", tracking_uri=sqlite_registry, allow_pickle=True, spec=spec)
    assert "unpickling" in caplog.text
    assert sorted(p.name for p in (tmp_path / "out" / "package").iterdir()) == ["model.json", "model.safetensors"]
    loaded, _ = load_package(tmp_path / "out" / "package")
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(loaded(x), net(x))


def test_unreachable_registry_fails_after_bounded_retries(closed_port_uri, tmp_path):
    start = time.monotonic()
    with pytest.raises(RegistryError, match=rf"{closed_port_uri} is unreachable after 3 attempts"):
        pull("m@candidate", tmp_path, tracking_uri=closed_port_uri, retries=3, backoff_s=0.1)
    assert time.monotonic() - start < 10


@pytest.fixture(scope="module")
def hardened(tmp_path_factory):
    """A package, its ONNX export, its sha256 and an evidence file (exported once per module)."""
    before = {"acc": 0.9, "asr/badnets": 0.98, "asr_lift/badnets": 0.98}
    after = {"acc": 0.89, "asr/badnets": 0.01, "asr_lift/badnets": 0.01}
    return tiny_hardened(tmp_path_factory.mktemp("hardened"), before, after)  # blessing.json: blessed


def _register(uri, name, files, blessed, **kw):
    return register_hardened(name, tracking_uri=uri, metrics={"clean_acc": 0.91, "asr_badnets": 0.02},
                             tags={"source.name": name, "source.version": "1", "params.sha256": "ab" * 32},
                             description="NFT-hardened test model", blessed=blessed, **{**files, **kw})


def test_register_blessed_moves_alias(registry_uri, model_name, make_package, hardened):
    register_candidate(make_package()[2], model_name, tracking_uri=registry_uri)
    result = _register(registry_uri, model_name, hardened, blessed=True)
    assert (result.version, result.status, result.alias_moved) == (2, "blessed", True)
    client = MlflowClient(registry_uri, registry_uri)
    mv = client.get_model_version_by_alias(model_name, "champion")
    assert int(mv.version) == 2 and mv.run_id == result.run_id
    assert mv.tags[STATUS_TAG] == "blessed" and mv.tags[ONNX_SHA_TAG] == hardened["onnx_sha256"]
    assert mv.tags["source.name"] == model_name and "NFT-hardened test model" in mv.description
    run = client.get_run(result.run_id)
    assert run.data.metrics["clean_acc"] == pytest.approx(0.91)
    logged = {a.path for a in client.list_artifacts(result.run_id, "evidence")}
    assert logged == {"evidence/blessing.json"}
    assert int(client.get_model_version_by_alias(model_name, "candidate").version) == 1


def test_register_hardened_pulls_back_as_package(registry_uri, model_name, hardened, tmp_path):
    _register(registry_uri, model_name, hardened, blessed=True)
    prov = pull(f"{model_name}@champion", tmp_path / "pulled", tracking_uri=registry_uri)
    assert prov.files_sha256["model.safetensors"] == sha256_file(hardened["package_dir"] / "model.safetensors")


def test_rejected_version_leaves_alias(registry_uri, model_name, hardened):
    first = _register(registry_uri, model_name, hardened, blessed=True)
    result = _register(registry_uri, model_name, hardened, blessed=False, reasons=["ASR 0.93 > 0.10"])
    assert (result.status, result.alias_moved) == ("rejected", False)
    client = MlflowClient(registry_uri, registry_uri)
    assert int(client.get_model_version_by_alias(model_name, "champion").version) == first.version
    mv = client.get_model_version(model_name, str(result.version))
    assert mv.tags[STATUS_TAG] == "rejected" and mv.tags[REASONS_TAG] == "ASR 0.93 > 0.10"
    assert "champion" not in (mv.aliases or [])


def test_hash_mismatch_refuses_to_register(registry_uri, model_name, hardened):
    with pytest.raises(RegistryError, match="refusing to register a file other than the one evaluated"):
        _register(registry_uri, model_name, {**hardened, "onnx_sha256": "0" * 64}, blessed=True)
    client = MlflowClient(registry_uri, registry_uri)
    assert client.search_model_versions(f"name='{model_name}'") == []


def test_failure_after_run_started_tags_version_failed(registry_uri, model_name, hardened):
    """An alias name MLflow rejects makes the very last step fail: the version is tagged failed, no alias."""
    with pytest.raises(RegistryError, match="version 1 tagged failed"):
        _register(registry_uri, model_name, hardened, blessed=True, alias="bad alias!")
    client = MlflowClient(registry_uri, registry_uri)
    mv = client.get_model_version(model_name, "1")
    assert mv.tags[STATUS_TAG] == "failed" and not mv.aliases
    assert client.get_run(mv.run_id).info.status == "FAILED"
    assert _register(registry_uri, model_name, hardened, blessed=True).alias_moved  # a rerun succeeds


def test_registered_onnx_is_a_pyfunc_model_with_baked_normalisation(sqlite_registry, model_name, hardened):
    result = _register(sqlite_registry, model_name, hardened, blessed=True,
                       input_example=np.random.rand(2, 3, 32, 32).astype(np.float32))
    mv = MlflowClient(sqlite_registry, sqlite_registry).get_model_version(model_name, str(result.version))
    served = mlflow.pyfunc.load_model(mv.source)  # what `mlflow models serve` loads
    x = np.random.rand(4, 3, 32, 32).astype(np.float32)
    logits = served.predict(x)["logits"]
    net, spec = load_package(hardened["package_dir"])
    with torch.no_grad():
        expected = spec.wrap(net)(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=0)


def test_logging_the_onnx_flavour_prints_no_cuda_provider_noise_on_a_machine_without_a_gpu(
        sqlite_registry, model_name, hardened, capfd, caplog):
    """MLflow checks the input example by opening the model with the MLmodel's providers, CUDA first (kept for
    serving); with onnxruntime-gpu and no GPU that throwaway session printed a red error about a CUDA library, an
    onnxruntime warning and MLflow's warning in every promote. Where a GPU works, none of them appears either."""
    capfd.readouterr()
    with caplog.at_level("WARNING", logger="mlflow.onnx"):
        _register(sqlite_registry, model_name, hardened, blessed=True,
                  input_example=np.random.rand(2, 3, 32, 32).astype(np.float32))
    err = capfd.readouterr().err
    assert "CUDAExecutionProvider" not in err and "libonnxruntime_providers_cuda" not in err
    assert [r.getMessage() for r in caplog.records if r.name == "mlflow.onnx"] == []
    mv = MlflowClient(sqlite_registry, sqlite_registry).get_model_version(model_name, "1")
    providers = mlflow.pyfunc.load_model(mv.source).metadata.flavors["onnx"]["providers"]
    assert providers == ["CUDAExecutionProvider", "CPUExecutionProvider"]  # served CUDA first where there is one


def test_a_version_in_an_artifact_store_this_environment_cannot_read_is_a_registry_error(tmp_path):
    """Issue 12: a version whose source is s3://... ended in ModuleNotFoundError (exit 1)."""
    from mlflow import MlflowClient

    from harden.errors import exit_code
    from harden.registry import RegistryError, pull

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri, uri)
    client.create_registered_model("in-s3")
    client.create_model_version("in-s3", "s3://bucket.invalid/models/in-s3/1")
    with pytest.raises(RegistryError, match=r"s3://bucket.invalid.*(boto3|cannot download)") as info:
        pull("models:/in-s3/1", tmp_path / "out", tracking_uri=uri)
    assert exit_code(info.value) == 4 and not (tmp_path / "out" / "package").exists()


def _rejected_blessing(tmp_path):
    evaluate_gate({}, {"acc": 0.9, "asr/badnets": 0.98, "asr_lift/badnets": 0.98},
                  {"acc": 0.5, "asr/badnets": 0.5, "asr_lift/badnets": 0.5},
                  {"onnx_parity": True, "fold_check": True}).write(tmp_path)
    return tmp_path / "blessing.json"


def test_a_version_tagged_blessed_by_hand_never_holds_the_alias(registry_uri, model_name, hardened, tmp_path):
    """Issue 12: the alias rule trusted the tag; anyone with write access could tag a rejected version blessed.
    Now a contender counts only when its registered blessing (manifest -> sha256 -> checks) says so."""
    champion = _register(registry_uri, model_name, hardened, blessed=True).version
    rejected = _register(registry_uri, model_name, {**hardened, "evidence": {"blessing": _rejected_blessing(tmp_path)}},
                         blessed=False).version
    client = MlflowClient(registry_uri, registry_uri)
    client.set_model_version_tag(model_name, str(rejected), STATUS_TAG, "blessed")  # the forgery
    with pytest.raises(RegistryError, match=f"version {rejected} cannot hold @champion: its registered blessing "
                                            "says not blessed"):
        move_alias(model_name, rejected, "champion", tracking_uri=registry_uri)
    assert move_alias(model_name, champion, "champion", tracking_uri=registry_uri) == champion
    newest = _register(registry_uri, model_name, hardened, blessed=True)
    assert newest.alias_moved and int(client.get_model_version_by_alias(model_name, "champion").version) == newest.version
    assert SUPERSEDED_TAG not in client.get_model_version(model_name, str(rejected)).tags


def test_a_blessed_registration_needs_a_blessing_that_says_so(registry_uri, model_name, hardened, tmp_path):
    for evidence, message in ((_rejected_blessing(tmp_path), "it says not blessed"),
                              (tmp_path / "plain.json", "is not a blessing record")):
        if evidence.name == "plain.json":
            evidence.write_text(json.dumps({"blessed": True}))
        with pytest.raises(RegistryError, match=message):
            _register(registry_uri, model_name, {**hardened, "evidence": {"blessing": evidence}}, blessed=True)
    assert MlflowClient(registry_uri, registry_uri).search_model_versions(f"name='{model_name}'") == []
