"""The checkpoint format: round trip, digests, atomic writes, fallback, retention."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

import shared.checkpoint as ck
from shared.checkpoint import (
    CheckpointCorruptError,
    CheckpointWriter,
    best_checkpoint,
    checkpoint_digest,
    decode_tree,
    encode_tree,
    latest_valid_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_model,
    load_model_weights,
    save_checkpoint,
    snapshot,
    verify_checkpoint,
)
from shared.model import Llama, model_preset


def _model_state():
    torch.manual_seed(0)
    return Llama(model_preset("tiny")).state_dict()


def _state(step=1):
    return {
        "step": step,
        "optimizer": {"state": {"w": {"step": torch.tensor(3.0), "exp_avg": torch.randn(4, 4)}},
                      "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.95), "params": ["w"]}]},
        "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()},
        "data": {"cursor": 123, "weights": [0.5, 0.5]},
        "int_keys": {1: "a", 2: "b"},
        "model_config": model_preset("tiny").model_dump(mode="json"),
    }


def test_tree_encoding_round_trips_tuples_arrays_and_int_keys():
    obj = _state()
    tree, tensors = encode_tree(obj)
    json.dumps(tree)  # the non-tensor part is plain JSON
    back = decode_tree(tree, tensors)
    assert back["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.95)
    assert back["int_keys"] == {1: "a", 2: "b"}
    assert back["rng"]["python"] == obj["rng"]["python"]
    np.testing.assert_array_equal(back["rng"]["numpy"][1], obj["rng"]["numpy"][1])


def test_save_load_round_trip_is_exact_and_tied_weights_are_stored_once(tmp_path):
    msd, state = _model_state(), _state()
    info = save_checkpoint(tmp_path, 7, msd, state, metric=2.5, meta={"reason": "interval"})
    assert info.path.name == "step-000000007" and info.step == 7 and info.metric == 2.5
    assert info.digest == checkpoint_digest(info.path) == verify_checkpoint(info.path)
    c = load_checkpoint(info.path)
    assert c.step == 7 and c.meta["reason"] == "interval" and c.digest == info.digest
    for k, v in msd.items():
        assert torch.equal(c.model[k], v), k
    assert c.model["lm_head.weight"] is c.model["embed_tokens.weight"]
    assert torch.equal(c.state["optimizer"]["state"]["w"]["exp_avg"], state["optimizer"]["state"]["w"]["exp_avg"])
    assert c.state["data"] == {"cursor": 123, "weights": [0.5, 0.5]}
    manifest = json.loads((info.path / "manifest.json").read_text())
    assert set(manifest["files"]) == {"model.safetensors", "state.safetensors", "state.json"}


def test_load_model_rebuilds_the_network(tmp_path):
    msd = _model_state()
    info = save_checkpoint(tmp_path, 1, msd, _state())
    model, cfg = load_model(info.path)
    assert cfg == model_preset("tiny")
    ids = torch.randint(0, 1024, (1, 8))
    ref = Llama(cfg)
    ref.load_state_dict(msd)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), ref(ids))


def test_our_safetensors_writer_is_read_by_safetensors_itself(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    tensors = {"f32": torch.randn(3, 5), "bf16": torch.randn(7).bfloat16(), "u8": torch.arange(4, dtype=torch.uint8),
               "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 3), "b": torch.tensor([True, False]),
               "u32": torch.tensor([1, 2**32 - 1], dtype=torch.uint32)}
    digest, size = ck.write_safetensors(tmp_path / "x.safetensors", tensors, {"k": "v"})
    back = load_file(str(tmp_path / "x.safetensors"))
    assert set(back) == set(tensors)
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k
    with safe_open(str(tmp_path / "x.safetensors"), framework="pt") as f:
        assert f.metadata() == {"k": "v"}
    assert size == (tmp_path / "x.safetensors").stat().st_size
    from shared.artifacts import sha256_file

    assert digest == sha256_file(tmp_path / "x.safetensors")


def test_snapshot_is_independent_of_later_updates(tmp_path):
    w = torch.zeros(3)
    snap = snapshot(1, {"w": w}, {"x": w})
    w += 1
    info = ck.write_checkpoint(tmp_path, snap)
    assert torch.equal(load_checkpoint(info.path).model["w"], torch.zeros(3))


@pytest.mark.parametrize("victim", ["model.safetensors", "state.safetensors", "state.json"])
def test_a_corrupt_file_is_refused_by_name_and_latest_falls_back(tmp_path, victim):
    msd = _model_state()
    first = save_checkpoint(tmp_path, 1, msd, _state(1))
    second = save_checkpoint(tmp_path, 2, msd, _state(2))
    path = second.path / victim
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointCorruptError, match=victim) as err:
        load_checkpoint(second.path)
    assert err.value.file == victim
    assert latest_valid_checkpoint(tmp_path) == first.path


def test_a_tampered_manifest_changes_the_digest_and_an_expected_digest_is_enforced(tmp_path):
    info = save_checkpoint(tmp_path, 1, _model_state(), _state())
    with pytest.raises(CheckpointCorruptError, match="expected"):
        verify_checkpoint(info.path, expected_digest="0" * 64)
    (info.path / "manifest.json").unlink()
    with pytest.raises(CheckpointCorruptError, match=r"manifest\.json"):
        verify_checkpoint(info.path)
    assert latest_valid_checkpoint(tmp_path) is None


def test_a_crash_during_the_write_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    msd = _model_state()
    first = save_checkpoint(tmp_path, 1, msd, _state(1))
    real = ck.write_safetensors
    calls = {"n": 0}

    def crash_on_second_file(path, tensors, metadata, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full")
        return real(path, tensors, metadata, **kw)

    monkeypatch.setattr(ck, "write_safetensors", crash_on_second_file)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, 2, msd, _state(2))
    assert [i.step for i in list_checkpoints(tmp_path)] == [1]
    assert not any(p.name.startswith(".tmp-") for p in tmp_path.iterdir())
    assert latest_valid_checkpoint(tmp_path) == first.path


def test_leftover_temporary_directories_are_never_listed_and_are_cleaned(tmp_path):
    save_checkpoint(tmp_path, 1, _model_state(), _state())
    (tmp_path / ".tmp-step-000000002-dead").mkdir()
    assert [i.step for i in list_checkpoints(tmp_path)] == [1]
    assert ck.clean_temporary(tmp_path)
    assert not (tmp_path / ".tmp-step-000000002-dead").exists()


def test_retention_keeps_the_last_k_plus_the_best(tmp_path):
    msd = {"w": torch.zeros(2)}
    metrics = {1: 3.0, 2: 1.0, 3: 2.5, 4: 2.0, 5: None, 6: 2.2}
    for step, m in metrics.items():
        save_checkpoint(tmp_path, step, msd, {"s": step}, metric=m, keep_last=2)
    assert [i.step for i in list_checkpoints(tmp_path)] == [2, 5, 6]
    assert best_checkpoint(tmp_path).name == "step-000000002"


def test_rewriting_a_step_replaces_it(tmp_path):
    save_checkpoint(tmp_path, 3, {"w": torch.zeros(2)}, {"v": 1})
    save_checkpoint(tmp_path, 3, {"w": torch.ones(2)}, {"v": 2})
    c = load_checkpoint(tmp_path / "step-000000003")
    assert c.state["v"] == 2 and torch.equal(c.model["w"], torch.ones(2))


def test_background_writer_writes_in_order_and_reports_through_futures(tmp_path):
    writer = CheckpointWriter(tmp_path, keep_last=2, duty_cycle=0.5)
    futs = [writer.submit(snapshot(s, {"w": torch.full((8,), float(s))}, {"s": s})) for s in (1, 2, 3)]
    writer.wait()
    assert [f.result().step for f in futs] == [1, 2, 3]
    assert [f.result().step for f in writer.done()] == [1, 2, 3]
    assert [i.step for i in list_checkpoints(tmp_path)] == [2, 3]
    assert torch.equal(load_model_weights(tmp_path / "step-000000003")["w"], torch.full((8,), 3.0))
    writer.close()


def test_background_write_failure_surfaces_on_the_next_call(tmp_path, monkeypatch):
    writer = CheckpointWriter(tmp_path)

    def boom(*a, **k):
        raise OSError("read-only file system")

    monkeypatch.setattr(ck, "write_safetensors", boom)
    fut = writer.submit(snapshot(1, {"w": torch.zeros(1)}, {}))
    with pytest.raises(OSError):
        fut.result(timeout=10)
    with pytest.raises(ck.CheckpointError, match="read-only"):
        writer.wait()
    writer.close()


def test_nothing_is_unpickled(tmp_path, monkeypatch):
    info = save_checkpoint(tmp_path, 1, _model_state(), _state())

    def forbidden(*a, **k):
        raise AssertionError("torch.load / pickle used")

    monkeypatch.setattr(torch, "load", forbidden)
    import pickle

    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    load_checkpoint(info.path)
    load_model(info.path)
