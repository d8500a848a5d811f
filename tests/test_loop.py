"""The one training loop: every defense resumes an interrupted run (raised from inside, or SIGKILL) to exactly the
weights and history of an uninterrupted one, never resumes a checkpoint of something else, and the
reparametrizations of NFT, ANP and FIP attach, describe, re-attach and fold through one mechanism."""

import copy
import sys
import textwrap

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.utils.data import TensorDataset

from kill import sigkill_after_checkpoint
from nft_core import loop
from nft_core.batches import DeviceBatches
from nft_core.config import FTConfig
from nft_core.defenses import StaleCheckpoint, run_defense
from nft_core.loop import checkpoint_files, remove_checkpoint, train_epochs
from nft_core.models import Normalized, build_model
from nft_core.reparam import KINDS, NeuronMask, Reparam, describe, fold, reattach

SIZE = 16

#: tiny settings: 20 samples at batch 8 are 3 steps per epoch; 3 epochs (ANP: 3 passes) unless a test says otherwise
RUNS = {
    "nft": ("nft", {"epochs": 3}),
    "ft": ("ft", {"epochs": 3}),
    "fp": ("fp", {"epochs": 3}),
    "anp": ("anp", {"iterations": 9, "prune_count": 3}),
    "ft_sam": ("ft_sam", {"epochs": 3}),
    "pbe": ("pbe", {"epochs": 2, "adv_epochs": 2, "adv_steps": 1}),
    "pbe_progressive": ("pbe", {"epochs": 1, "adv_epochs": 1, "adv_steps": 1, "mode": "progressive",
                                "iterations": 2}),
    "fip": ("fip", {"epochs": 3, "fisher_samples": 4}),
    "fip_fast": ("fip", {"epochs": 3, "fisher_samples": 4, "variant": "fast"}),
}
#: (run, checkpoints written before the simulated kill); PBE's cover a kill inside the adversarial phase, right
#: after it finished, and inside the clean phase; progressive: inside round 2
KILLS = [("nft", 1), ("ft", 2), ("fp", 1), ("anp", 2), ("ft_sam", 1), ("pbe", 1), ("pbe", 2), ("pbe", 3),
         ("pbe_progressive", 3), ("fip", 2), ("fip_fast", 1)]


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread, as the SIGKILL test's child: a reduction's result depends on the thread count, and
    on two shared cores one thread is also much the faster."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class Killed(Exception):
    """Stands in for a kill right after a checkpoint was written."""


def _tiny():
    torch.manual_seed(0)
    model = Normalized(build_model("small_cnn", num_classes=10, width=4), [0.5] * 3, [0.25] * 3)
    return model, TensorDataset(torch.rand(20, 3, SIZE, SIZE), torch.arange(20) % 10)


def _run(key, model, data, **kwargs):
    name, settings = RUNS[key]
    return run_defense(name, model, data, progress=False, batch_size=8, device="cpu", **settings, **kwargs)


def _same(a, b):
    sa, sb = a.model.state_dict(), b.model.state_dict()
    return list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa) and a.history == b.history


@pytest.mark.parametrize(("key", "saves"), KILLS, ids=[f"{k}-after-{n}" for k, n in KILLS])
def test_interrupted_run_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch, key, saves):
    model, data = _tiny()
    ckpt = tmp_path / "run.ckpt"
    real_save, written = loop._atomic_save, []

    def save_then_die(obj, path):
        real_save(obj, path)
        written.append(path)
        if len(written) == saves:
            raise Killed

    monkeypatch.setattr(loop, "_atomic_save", save_then_die)
    with pytest.raises(Killed):
        _run(key, model, data, checkpoint=ckpt)
    monkeypatch.setattr(loop, "_atomic_save", real_save)
    assert ckpt.exists() and set(written) <= set(checkpoint_files(ckpt))

    resumed = _run(key, model, data, checkpoint=ckpt)
    assert _same(resumed, _run(key, model, data))
    assert _same(_run(key, model, data, checkpoint=ckpt), resumed)  # every phase finished: nothing retrains
    remove_checkpoint(ckpt)
    assert checkpoint_files(ckpt) == []


def test_finished_phase_is_loaded_without_training(tmp_path):
    model, data = _tiny()
    ckpt = tmp_path / "ft.ckpt"
    config = FTConfig(epochs=2, batch_size=8, device="cpu", progress=False)
    phase = loop.Checkpoint(ckpt, config).phase("train", model, data)
    batches = DeviceBatches(data, 8)
    steps = []

    def step(m, x, y):
        steps.append(len(x))
        return {"loss": m(x).sum().detach()}

    first = train_epochs(model, batches, step, 2, progress=False, checkpoint=phase)
    assert (first.resumed_at, len(steps)) == (0, 6)
    again = train_epochs(model, DeviceBatches(data, 8), step, 2, progress=False, checkpoint=phase)
    assert (again.resumed_at, len(steps), again.history) == (2, 6, first.history)


CHILD = textwrap.dedent("""
    import sys, torch
    from torch.utils.data import TensorDataset
    from nft_core.defenses import run_defense
    from nft_core.models import Normalized, build_model
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = Normalized(build_model("small_cnn", num_classes=10, width=4), [0.5] * 3, [0.25] * 3)
    data = TensorDataset(torch.rand(20, 3, 16, 16), torch.arange(20) % 10)
    run_defense("ft_sam", model, data, epochs=int(sys.argv[2]), batch_size=8, device="cpu", progress=False,
                checkpoint=sys.argv[1])
""")


def test_sigkilled_baseline_resumes_to_the_uninterrupted_result(tmp_path):
    epochs = 300
    ckpt = tmp_path / "ft_sam.ckpt"
    done = sigkill_after_checkpoint([sys.executable, "-c", CHILD, str(ckpt), str(epochs)], ckpt)
    assert 1 <= done < epochs, "the child finished before it could be killed; raise `epochs`"

    model, data = _tiny()
    settings = {"epochs": epochs, "batch_size": 8, "device": "cpu", "progress": False}
    resumed = run_defense("ft_sam", model, data, checkpoint=ckpt, **settings)
    assert _same(resumed, run_defense("ft_sam", model, data, **settings))


@pytest.mark.parametrize("key", ["ft", "anp", "pbe"])
def test_checkpoint_of_another_candidate_clean_set_or_config_is_never_resumed(tmp_path, key):
    model, data = _tiny()
    ckpt = tmp_path / "run.ckpt"
    _run(key, model, data, checkpoint=ckpt)
    other_model = copy.deepcopy(model)
    with torch.no_grad():
        next(other_model.parameters()).mul_(1.01)
    other_data = TensorDataset(data.tensors[0].flip(-1), data.tensors[1])
    for m, d, changes in ((other_model, data, {}), (model, other_data, {}), (model, data, {"seed": 1})):
        with pytest.raises(StaleCheckpoint, match="another candidate, clean set or config"):
            _run(key, model=m, data=d, checkpoint=ckpt, **changes)
    restarted = _run(key, other_model, data, checkpoint=ckpt, stale_checkpoint="restart")
    assert _same(restarted, _run(key, other_model, data))


def test_non_finite_loss_names_the_epoch():
    model, data = _tiny()
    with pytest.raises(FloatingPointError, match="at epoch 1"):
        train_epochs(model, DeviceBatches(data, 8), lambda m, x, y: {"loss": torch.tensor(float("nan"))}, 2,
                     progress=False)


def test_nft_result_carries_the_masked_model_and_its_facts():
    model, data = _tiny()
    result = _run("nft", model, data)
    facts = {"layers", "lower_bounds", "eta", "samples_per_class", "trainable_params", "total_params", "device"}
    assert facts <= set(result.extra) and result.extra["device"] == "cpu"
    assert len(result.extra["layers"]) == len(result.extra["lower_bounds"]) == len(describe(result.unfolded))
    x = torch.rand(4, 3, SIZE, SIZE)
    with torch.no_grad():
        assert torch.allclose(result.unfolded(x), result.model(x), atol=1e-5)
    assert _run("ft", model, data).unfolded is None


@pytest.mark.parametrize("key", ["nft", "fip_fast"])
def test_reparametrized_state_loads_strictly_into_a_fresh_copy_after_reattach(key):
    """A fresh candidate copy with the described reparametrizations re-attached takes the reparametrized state
    dict strictly and computes the same outputs (descriptors round-trip through plain dicts)."""
    model, data = _tiny()
    if key == "nft":
        trained = _run("nft", model, data).unfolded
    else:
        from nft_core.defenses.fip import attach_spectral

        trained = Normalized(build_model("small_cnn", num_classes=10, width=4), [0.5] * 3, [0.25] * 3)
        attach_spectral(trained, torch.rand(1, 3, SIZE, SIZE))
        with torch.no_grad():
            for m in trained.modules():
                if type(m) is KINDS["spectral_delta"]:
                    m.s.mul_(0.9)
    descriptors = [Reparam.from_dict(r.to_dict()) for r in describe(trained)]
    assert descriptors and {r.kind for r in descriptors} == {"neuron_mask" if key == "nft" else "spectral_delta"}
    fresh = Normalized(build_model("small_cnn", num_classes=10, width=4), [0.5] * 3, [0.25] * 3)
    reattach(fresh, descriptors)
    fresh.load_state_dict(trained.state_dict(), strict=True)
    x = torch.rand(4, 3, SIZE, SIZE)
    trained.eval(), fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), trained(x))
        folded = fold(fresh)(x)
    assert torch.allclose(folded, trained(x), atol=1e-5)
    assert not any(parametrize.is_parametrized(m) for m in fresh.modules())


def test_only_known_single_reparametrizations_fold_or_load():
    class Double(nn.Module):
        def forward(self, w):
            return 2 * w

    layer = nn.Linear(3, 2)
    parametrize.register_parametrization(layer, "weight", Double())
    with pytest.raises(ValueError, match="only a single one of"):
        fold(layer)
    stacked = nn.Linear(3, 2)
    parametrize.register_parametrization(stacked, "weight", NeuronMask(2, 2, 1))
    parametrize.register_parametrization(stacked, "weight", NeuronMask(2, 2, 1))
    with pytest.raises(ValueError, match="NeuronMask', 'NeuronMask'"):
        fold(stacked, kinds=("neuron_mask",))
    assert parametrize.is_parametrized(stacked, "weight")  # refused before anything was touched
    with pytest.raises(ValueError, match="unknown reparametrization kind 'os.system'"):
        Reparam.from_dict({"module": "", "tensor": "weight", "kind": "os.system", "size": 2, "layer_index": 1})
    with pytest.raises(ValueError, match="size 2, the descriptor says 3"):
        reattach(nn.Linear(3, 2), [Reparam("", "weight", "neuron_mask", 3, 1)])


def test_attach_is_all_or_none():
    from nft_core.reparam import attach

    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="has no module 'missing'"):
        attach(model, "neuron_mask", "weight", ["0", "1", "missing"])
    assert not any(parametrize.is_parametrized(m) for m in model.modules())


def test_a_progress_bar_in_a_log_is_whole_lines_and_on_a_terminal_redraws(monkeypatch):
    """Where stderr is not a terminal (a pod's log) each redraw is a line of its own, at most one per interval;
    on a terminal it is tqdm's usual carriage-return redraw."""
    import io

    from nft_core import progress

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    for stream, in_place in ((io.StringIO(), False), (Terminal(), True)):
        monkeypatch.setattr(sys, "stderr", stream)
        for _ in progress.bar(range(1000), desc="NFT", unit="epoch"):
            pass
        text = stream.getvalue()
        assert ("\r" in text) is in_place, repr(text[:200])
        if not in_place:
            lines = text.splitlines()
            assert 2 <= len(lines) <= 3, lines  # the first draw, the last, and at most one in between
            assert lines[-1].startswith("NFT: 100%|") and lines[-1].endswith("epoch/s]"), lines
