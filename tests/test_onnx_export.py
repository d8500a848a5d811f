"""ONNX export through the current exporter, dynamic batch, and ONNX Runtime vs PyTorch parity."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

from harden.onnx_export import (
    INPUT_NAME,
    OUTPUT_NAME,
    check_parity,
    export_onnx,
    onnx_predict_logits,
    onnx_session,
    quiet_gpu_provider_probe,
    session_provider,
)
from nft_core.models import Normalized, build_model

MEAN, STD = [0.49, 0.48, 0.45], [0.25, 0.24, 0.26]


def _model(builder, seed=0, **kwargs):
    torch.manual_seed(seed)
    return Normalized(build_model(builder, num_classes=10, **kwargs), MEAN, STD).eval()


def _batches(seed=1):
    gen = torch.Generator().manual_seed(seed)
    # "clean": a structured image batch (smooth gradients + noise) standing in for real data; "random": uniform.
    ramp = torch.linspace(0, 1, 32).view(1, 1, 1, 32).expand(6, 3, 32, 32)
    clean = (0.7 * ramp + 0.3 * torch.rand(6, 3, 32, 32, generator=gen)).clamp(0, 1)
    return {"clean": clean, "random": torch.rand(7, 3, 32, 32, generator=gen)}


@pytest.mark.parametrize("builder,kwargs", [
    ("small_cnn", {"width": 8}),
    ("preact_resnet18", {"width": 16}),
    ("torchvision.resnet18", {}),
], ids=["small_cnn", "preact_resnet18-w16", "torchvision.resnet18"])
def test_export_dynamic_batch_and_parity(tmp_path, builder, kwargs):
    model = _model(builder, **kwargs)
    path = export_onnx(model, (3, 32, 32), tmp_path / "model.onnx")
    graph = onnx.load(str(path)).graph
    assert [i.name for i in graph.input] == [INPUT_NAME] and [o.name for o in graph.output] == [OUTPUT_NAME]
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param  # symbolic batch dimension
    sess = onnx_session(path)
    for n in (1, 7):
        x = torch.rand(n, 3, 32, 32)
        logits = onnx_predict_logits(sess, x)
        assert logits.shape == (n, 10)
        with torch.no_grad():
            torch.testing.assert_close(logits, model(x), atol=1e-4, rtol=0)
    report = check_parity(path, model, _batches())
    assert report.passed, report
    assert report.max_abs_diff <= 1e-4 and report.argmax_agreement == 1.0
    assert report.provider == session_provider(sess)
    assert set(report.batches) == {"clean", "random"} and report.batches["random"]["n"] == 7


@pytest.mark.slow
def test_export_preact_resnet18_full_width(tmp_path):
    model = _model("preact_resnet18")
    path = export_onnx(model, (3, 32, 32), tmp_path / "model.onnx")
    assert check_parity(path, model, _batches()).passed


def test_normalisation_is_baked_into_the_graph(tmp_path):
    net = _model("small_cnn", width=8).net
    path = export_onnx(Normalized(net, MEAN, STD), (3, 32, 32), tmp_path / "model.onnx")
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        expected = net((x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1))
    torch.testing.assert_close(onnx_predict_logits(onnx_session(path), x), expected, atol=1e-5, rtol=0)


def test_tampered_initializer_caught_by_parity(tmp_path):
    model = _model("small_cnn", width=8)
    path = export_onnx(model, (3, 32, 32), tmp_path / "model.onnx")
    proto = onnx.load(str(path))
    init = max(proto.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    weights = numpy_helper.to_array(init).copy()
    weights *= -1.0
    init.CopyFrom(numpy_helper.from_array(weights, init.name))
    onnx.save(proto, str(path))
    report = check_parity(path, model, _batches())
    assert not report.passed
    assert report.max_abs_diff > 1e-4


def test_parity_against_a_different_model_fails(tmp_path):
    path = export_onnx(_model("small_cnn", seed=0, width=8), (3, 32, 32), tmp_path / "model.onnx")
    report = check_parity(path, _model("small_cnn", seed=1, width=8), _batches())
    assert not report.passed and report.max_abs_diff > 1e-4


def test_parity_tolerance_is_enforced(tmp_path):
    model = _model("small_cnn", width=8)
    path = export_onnx(model, (3, 32, 32), tmp_path / "model.onnx")
    with torch.no_grad():
        model.net.classifier.bias += 1e-3  # every logit shifts by 1e-3: argmax unchanged, diff ~1e-3
    strict = check_parity(path, model, _batches(), atol=1e-4)
    assert strict.argmax_agreement == 1.0 and not strict.passed
    assert check_parity(path, model, _batches(), atol=1e-2).passed


def test_export_keeps_training_mode_and_leaves_no_temp_files(tmp_path):
    model = _model("small_cnn", width=8).train()
    export_onnx(model, (3, 32, 32), tmp_path / "model.onnx")
    assert model.training
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]


def test_bad_input_shape_rejected(tmp_path):
    with pytest.raises(ValueError, match=r"\(3, 32\)"):
        export_onnx(_model("small_cnn", width=8), (3, 32), tmp_path / "model.onnx")


def _session_that_warns() -> None:
    """An ONNX Runtime session on a graph with an unused initializer: onnxruntime warns that it removes it."""
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["x"], ["y"])], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
        initializer=[numpy_helper.from_array(np.zeros(1, np.float32), "unused")])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    model.ir_version = 8
    ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def test_the_quiet_provider_probe_silences_only_its_block_and_only_without_a_gpu(monkeypatch, capfd):
    import logging
    mlflow_onnx = logging.getLogger("mlflow.onnx")
    level = mlflow_onnx.level
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    capfd.readouterr()
    with quiet_gpu_provider_probe():
        _session_that_warns()
        assert mlflow_onnx.getEffectiveLevel() == logging.ERROR
    assert "Removing initializer" not in capfd.readouterr().err
    _session_that_warns()  # onnxruntime's default severity is back
    assert "Removing initializer 'unused'" in capfd.readouterr().err and mlflow_onnx.level == level

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a usable GPU: nothing is silenced
    with quiet_gpu_provider_probe():
        _session_that_warns()
    assert "Removing initializer 'unused'" in capfd.readouterr().err
