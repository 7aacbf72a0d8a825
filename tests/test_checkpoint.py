"""Checkpoints: atomic writes, safe loading (weights_only=True), clear errors, exact restore."""

import os

import pytest
import torch

from service import checkpoint
from service.checkpoint import SCHEMA_VERSION, CheckpointError, load, make_state, restore_model, save
from service.model import build_model
from service.presets import get_preset, smoke
from service.priors import MixturePrior, VampPrior
from service.sampling import sample

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(prior_type: str = "mog"):
    cfg = smoke(get_preset("8gaussians/mog-ip-lc"))
    init = torch.randn(cfg.prior.num_components, 2, generator=torch.Generator().manual_seed(0))
    model = build_model(cfg, (2,), init_points=init, prior_type=prior_type)
    with torch.no_grad():  # move everything away from its initialisation
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    if isinstance(model.prior, MixturePrior):
        model.prior.init_clip_bounds()
    return cfg, model


def _state(prior_type: str = "mog"):
    cfg, model = _model(prior_type)
    opt = torch.optim.Adam(model.encoder.parameters())
    model.encoder(torch.randn(4, 2))[0].sum().backward()
    opt.step()
    gen = torch.Generator().manual_seed(5)
    state = make_state(model, cfg, iteration=6, data_shape=(2,), optimizers={"encoder": opt.state_dict()},
                       generators={"noise": gen.get_state()}, extra={"metrics": {"hist_kl": 1.5}})
    return cfg, model, state


def _assert_same(a, b, path="state"):
    """Nested containers of tensors and plain values are equal, tensors bit for bit."""
    assert type(a) is type(b), path
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{path}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), path
    else:
        assert a == b, path


# --------------------------------------------------------------------------------------------
# Round trip
# --------------------------------------------------------------------------------------------

def test_save_load_round_trip_is_exact(tmp_path):
    _, _, state = _state()
    path = save(tmp_path / "sub" / "checkpoint.pt", state)
    assert path == tmp_path / "sub" / "checkpoint.pt"
    loaded = load(path)
    assert loaded["schema_version"] == SCHEMA_VERSION and loaded["iteration"] == 6
    _assert_same(loaded, state)


@pytest.mark.parametrize("prior_type", ["mog", "vamp"])
def test_restored_model_gives_identical_outputs(tmp_path, prior_type):
    cfg, model, state = _state(prior_type)
    restored_cfg, restored = restore_model(load(save(tmp_path / "c.pt", state)))
    assert restored_cfg == cfg and type(restored.prior) is type(model.prior)
    x, z = torch.randn(64, 2), 2.0 * torch.randn(64, 2)
    with torch.no_grad():
        for a, b in zip(model.encoder(x), restored.encoder(x)):
            assert torch.equal(a, b)
        assert torch.equal(model.decoder(z), restored.decoder(z))
        assert torch.equal(model.prior.log_prob(z), restored.prior.log_prob(z))
    for a, b in zip(sample(model, 32, seed=3), sample(restored, 32, seed=3)):
        assert torch.equal(a, b)
    if prior_type == "mog":  # the soft-clip bounds travel with the model
        assert bool(restored.prior.clip_on) and torch.equal(restored.prior.clip_lo, model.prior.clip_lo)
    else:  # the VampPrior's components are the restored encoder's outputs
        assert isinstance(restored.prior, VampPrior) and restored.prior._encoder[0] is restored.encoder


# --------------------------------------------------------------------------------------------
# Atomic writes
# --------------------------------------------------------------------------------------------

def _failing_save(state, f, *args, **kwargs):
    f.write(b"PK\x03\x04 half a checkpoint")  # some bytes reach the disk, then the write fails
    raise OSError("No space left on device")


def test_failed_save_leaves_the_previous_checkpoint_untouched(tmp_path, monkeypatch):
    _, _, state = _state()
    path = save(tmp_path / "checkpoint.pt", state)
    good = path.read_bytes()
    monkeypatch.setattr(checkpoint.torch, "save", _failing_save)
    with pytest.raises(OSError, match="No space left"):
        save(path, {**state, "iteration": 7})
    assert path.read_bytes() == good and os.listdir(tmp_path) == ["checkpoint.pt"]  # no temp file left
    monkeypatch.undo()
    assert load(path)["iteration"] == 6


def test_failed_first_save_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint.torch, "save", _failing_save)
    with pytest.raises(OSError):
        save(tmp_path / "checkpoint.pt", {"schema_version": SCHEMA_VERSION})
    assert os.listdir(tmp_path) == []


def test_the_temp_file_is_fsynced_before_it_replaces_the_checkpoint(tmp_path, monkeypatch):
    _, _, state = _state()
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.path.realpath(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", os.path.realpath(src)))
        real_replace(src, dst)

    monkeypatch.setattr(checkpoint.os, "fsync", fsync)
    monkeypatch.setattr(checkpoint.os, "replace", replace)
    save(tmp_path / "checkpoint.pt", state)
    (kind0, tmp0), (kind1, tmp1), (kind2, folder) = events[:3]
    assert (kind0, kind1) == ("fsync", "replace") and tmp0 == tmp1 and ".tmp" in tmp0  # file fsynced, then renamed
    assert kind2 == "fsync" and folder == os.path.realpath(tmp_path)  # then the rename made durable


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_never_checkpointed(tmp_path, bad):
    _, _, state = _state()
    path = save(tmp_path / "checkpoint.pt", state)
    good = path.read_bytes()
    poisoned = {**state, "iteration": 7, "model": dict(state["model"])}
    name = next(k for k, v in poisoned["model"].items() if v.is_floating_point() and v.numel() > 1)
    poisoned["model"][name] = poisoned["model"][name].clone()
    poisoned["model"][name].view(-1)[1] = bad
    with pytest.raises(checkpoint.NonFiniteCheckpointError,
                       match=rf"refusing to write .*non-finite \(NaN/Inf\) values in {name} at iteration 7; "
                             "the previous checkpoint is kept"):
        save(path, poisoned)
    assert path.read_bytes() == good and os.listdir(tmp_path) == ["checkpoint.pt"]
    assert issubclass(checkpoint.NonFiniteCheckpointError, CheckpointError)


def test_atomic_copy_and_text_write_leave_whole_files_and_no_temp_files(tmp_path, monkeypatch):
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(3 << 20))
    dst = tmp_path / "out" / "dst.bin"
    checkpoint.atomic_copy(src, dst)
    assert dst.read_bytes() == src.read_bytes()
    checkpoint.atomic_write_text(tmp_path / "out" / "m.json", '{"a": 1}')
    assert (tmp_path / "out" / "m.json").read_text() == '{"a": 1}'

    def broken(fd):
        raise OSError("I/O error")

    monkeypatch.setattr(checkpoint.os, "fsync", broken)  # fails after all bytes were written
    with pytest.raises(OSError, match="I/O error"):
        checkpoint.atomic_write_text(tmp_path / "out" / "m.json", '{"a": 2}')
    assert (tmp_path / "out" / "m.json").read_text() == '{"a": 1}'
    assert sorted(os.listdir(tmp_path / "out")) == ["dst.bin", "m.json"]


# --------------------------------------------------------------------------------------------
# Safe loading and clear errors
# --------------------------------------------------------------------------------------------

def test_load_uses_weights_only(tmp_path, monkeypatch):
    _, _, state = _state()
    path = save(tmp_path / "c.pt", state)
    seen = {}
    original = torch.load

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "load", spy)
    load(path)
    assert seen["weights_only"] is True and seen["map_location"] == "cpu"


class _CreatesAFile:
    """Unpickling this calls ``open(marker, "w")``: what a malicious checkpoint could do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "ran"
    torch.save({"schema_version": SCHEMA_VERSION, "payload": _CreatesAFile(marker)}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match=r"is not a readable introprior checkpoint"):
        load(tmp_path / "evil.pt")
    assert not marker.exists()


def test_another_schema_version_is_refused_with_both_versions(tmp_path):
    _, _, state = _state()
    save(tmp_path / "old.pt", {**state, "schema_version": 99})
    with pytest.raises(CheckpointError, match=r"has schema_version 99; this introprior reads schema_version 1"):
        load(tmp_path / "old.pt")
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")  # readable, but not a checkpoint at all
    with pytest.raises(CheckpointError, match=r"has schema_version None"):
        load(tmp_path / "tensor.pt")


def test_corrupt_truncated_and_missing_files(tmp_path):
    (tmp_path / "noise.pt").write_bytes(os.urandom(256))
    _, _, state = _state()
    whole = save(tmp_path / "whole.pt", state).read_bytes()
    (tmp_path / "cut.pt").write_bytes(whole[: len(whole) // 2])
    for name in ("noise.pt", "cut.pt"):
        with pytest.raises(CheckpointError, match=rf"checkpoint: '.*{name}' is not a readable introprior checkpoint"):
            load(tmp_path / name)
    with pytest.raises(CheckpointError, match=r"checkpoint: '.*nowhere\.pt' does not exist"):
        load(tmp_path / "nowhere.pt")
