"""Fingerprint, signature, verification report, idempotency, model card and the ModelReady payload."""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from contracts import ModelReady, decode, encode
from contracts.codec import envelope
from contracts.envelope import Producer
from services.exporter.config import GGUF_TYPES, ExportConfig
from services.exporter.export import ExportError, export_checkpoint, model_ready_payload
from services.exporter.gguf_export import read_gguf
from services.exporter.hf import hf_tensors_to_canonical
from services.exporter.native import read_native_tensors, write_native
from services.exporter.provenance import NO_CONFIG_HASH, canonical_json, fingerprint, sign, verify_signature
from services.exporter.verify import embedded_fingerprints, verify_export
from shared.artifacts import ArtifactStore, sha256_file
from shared.checkpoint import write_safetensors

from .conftest import CONFIG_HASH, DATASET_VERSION, RUN_ID, SIGNING_KEY, trained_model


@pytest.fixture
def copy(export_result, tmp_path):
    """A private copy of the session's export to tamper with."""
    dst = tmp_path / "export"
    shutil.copytree(export_result.path, dst)
    return dst


def test_fingerprint_is_the_same_from_every_format_and_layout(export_result, trained):
    native_tensors, meta = read_native_tensors(export_result.path / "native")
    hf_tensors = hf_tensors_to_canonical(load_file(str(export_result.path / "hf" / "model.safetensors")), trained.config)
    gguf_tensors, _ = read_gguf(export_result.path / "gguf" / "model-f32.gguf")  # Q/K rows un-permuted
    fp = export_result.fingerprint
    assert fingerprint(native_tensors) == fingerprint(hf_tensors) == fingerprint(gguf_tensors) == fp
    assert fingerprint(dict(reversed(list(native_tensors.items())))) == fp  # order-independent
    # every written file carries it in its own metadata
    embedded = embedded_fingerprints(export_result.path, export_result.manifest)
    assert len(embedded) == 9 and set(embedded.values()) == {fp}
    assert meta["helox.run_id"] == RUN_ID and meta["helox.dataset_version"] == DATASET_VERSION
    assert meta["helox.config_hash"] == CONFIG_HASH and meta["helox.checkpoint_step"] == "200"
    assert meta["helox.code_version"]


def test_fingerprint_changes_when_one_weight_changes_or_a_dtype_differs(export_result):
    tensors, _ = read_native_tensors(export_result.path / "native")
    changed = dict(tensors)
    w = tensors["layers.2.mlp.down_proj.weight"].clone()
    w[5, 7] = torch.nextafter(w[5, 7], torch.tensor(1.0))  # one ulp
    changed["layers.2.mlp.down_proj.weight"] = w
    assert fingerprint(changed) != export_result.fingerprint
    assert fingerprint({k: v.half() for k, v in tensors.items()}) != export_result.fingerprint
    renamed = {("x." + k if k == "norm.weight" else k): v for k, v in tensors.items()}
    assert fingerprint(renamed) != export_result.fingerprint


def test_signature_verifies_and_fails_on_any_change_or_key():
    manifest = {"files": {"a": {"sha256": "0" * 64, "bytes": 1}}, "fingerprint": "f"}
    sig = sign(manifest, "k")
    assert verify_signature(manifest, sig, "k")
    assert verify_signature(json.loads(canonical_json(manifest)), sig, "k")  # key order does not matter
    assert not verify_signature(manifest, sig, "other")
    assert not verify_signature({**manifest, "fingerprint": "g"}, sig, "k")


def test_verify_export_passes_on_a_fresh_export(export_result):
    report = verify_export(export_result.path, SIGNING_KEY)
    assert report.ok, report.summary()
    assert [c.name for c in report.checks] == ["manifest", "signature", "digests", "fingerprint", "watermark", "loads"]
    assert [c.status for c in report.checks] == ["pass"] * 6
    assert report.watermark["detected"] and report.watermark["z"] > 10
    loads = next(c.detail for c in report.checks if c.name == "loads")
    for rel in (*export_result.formats["gguf"]["files"].values(), "onnx/model.onnx", "onnx/model_kv.onnx"):
        assert rel in loads, rel


def test_verify_export_fails_loads_when_llama_cpp_crashes_on_a_file_and_says_what_to_do(copy, monkeypatch):
    """A stock llama.cpp load that segfaults (q8_0 on CPUs with AMX) is a failed check naming the
    file and the workaround; the verifier itself carries on."""
    from services.exporter import gguf_export

    real = gguf_export._child_command

    def crash_on_q8(gguf_path, request, out):
        if gguf_path.name == "model-q8_0.gguf":
            return [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"]
        return real(gguf_path, request, out)

    monkeypatch.setattr(gguf_export, "_child_command", crash_on_q8)
    monkeypatch.setattr(gguf_export, "llama_cpp_missing", lambda: None)
    report = verify_export(copy, SIGNING_KEY, check_watermark=False)
    assert report.failed == ["loads"]
    detail = next(c.detail for c in report.checks if c.name == "loads")
    assert detail.startswith("gguf/model-q8_0.gguf: llama.cpp crashed (SIGSEGV) on model-q8_0.gguf")
    assert "n_batch=1" in detail and "f16" in detail
    assert "model-f16.gguf" not in detail  # the other files loaded


def _crash_q8_unless_one_token_batches(real):
    """A child that dies of SIGSEGV on model-q8_0.gguf unless asked for n_batch=1: llama.cpp's AMX bug."""

    def command(gguf_path, request, out):
        if gguf_path.name == "model-q8_0.gguf" and json.loads(Path(request).read_text()).get("n_batch") != 1:
            return [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"]
        return real(gguf_path, request, out)

    return command


def test_on_a_cpu_with_amx_a_q8_0_file_that_crashes_the_stock_load_is_checked_with_one_token_batches(
        copy, trained, monkeypatch):
    from services.exporter import gguf_export

    monkeypatch.setattr(gguf_export, "_child_command", _crash_q8_unless_one_token_batches(gguf_export._child_command))
    monkeypatch.setattr(gguf_export, "_cpu_has_amx", lambda: True)
    report = verify_export(copy, SIGNING_KEY, check_watermark=False)
    assert report.failed == []
    loads = next(c.detail for c in report.checks if c.name == "loads")
    assert "gguf/model-q8_0.gguf (llama-cpp-python" in loads and f"loaded as {gguf_export.AMX_LOAD}" in loads
    assert loads.count("n_batch=1") == 1  # only the Q8_0 file needed it
    res = gguf_export.check_gguf(copy / "gguf", trained_model(trained), trained.tokenizer)
    assert res["passed"] and res["q8_0"]["settings"] == gguf_export.AMX_LOAD
    assert res["q8_0"]["stock_load"].startswith("llama.cpp crashed (SIGSEGV) on model-q8_0.gguf")
    assert res["q8_0"]["top1_agreement"] >= 0.8 and "settings" not in res["f16"]
    # Without AMX the same crash is not the known bug: no second load, the file fails.
    monkeypatch.setattr(gguf_export, "_cpu_has_amx", lambda: False)
    assert verify_export(copy, SIGNING_KEY, check_watermark=False).failed == ["loads"]


def test_verify_export_names_a_tampered_file(copy):
    f = copy / "gguf" / "model-q8_0.gguf"
    data = bytearray(f.read_bytes())
    data[-100] ^= 0xFF
    f.write_bytes(bytes(data))
    report = verify_export(copy, SIGNING_KEY)
    assert report.failed == ["digests"]
    assert "gguf/model-q8_0.gguf: sha256 differs" in next(c.detail for c in report.checks if c.name == "digests")


def test_verify_export_fails_the_signature_for_an_edited_manifest_or_a_wrong_key(copy):
    # the watermark key is derived from the signing key: a wrong key misses both
    assert verify_export(copy, "not-the-key").failed == ["signature", "watermark"]
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["lineage"]["run_id"] = "someone-else"
    (copy / "manifest.json").write_bytes(canonical_json(manifest))
    report = verify_export(copy, SIGNING_KEY)
    assert report.failed == ["signature"]
    assert "altered" in next(c.detail for c in report.checks if c.name == "signature")


def test_verify_export_fails_the_fingerprint_when_weights_are_swapped_and_re_signed(copy):
    """Someone with the key replaces the weights and re-signs: digests and signature pass, the
    fingerprint (and the watermark) do not."""
    path = copy / "native" / "model.safetensors"
    tensors, meta = read_native_tensors(path)
    tensors = {k: v.clone() for k, v in tensors.items()}
    tensors["layers.0.mlp.up_proj.weight"].mul_(1.01)
    write_safetensors(path, tensors, meta)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["files"]["native/model.safetensors"] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    (copy / "manifest.json").write_bytes(canonical_json(manifest))
    sig = json.loads((copy / "signature.json").read_text())
    sig["signature"] = sign(manifest, SIGNING_KEY)
    (copy / "signature.json").write_text(json.dumps(sig))
    report = verify_export(copy, SIGNING_KEY)
    assert report.status("signature") == "pass" and report.status("digests") == "pass"
    assert report.failed == ["fingerprint"]


def test_verify_export_fails_the_watermark_with_another_watermark_key(export_result):
    report = verify_export(export_result.path, SIGNING_KEY, watermark_key="another-watermark-key")
    assert report.failed == ["watermark"]
    assert abs(report.watermark["z"]) < 5


def test_verify_export_reports_a_missing_manifest_without_raising(tmp_path):
    report = verify_export(tmp_path, SIGNING_KEY)
    assert report.failed == ["manifest"] and not report.ok and len(report.checks) == 6
    assert "FAILED: manifest" in report.summary()


def test_export_is_idempotent_by_checkpoint_digest(export_result, trained):
    started = time.perf_counter()
    again = export_checkpoint(
        trained.checkpoint, trained.tokenizer, None, export_result.path.parent, run_id=RUN_ID,
        dataset_version=DATASET_VERSION, config_hash=CONFIG_HASH, signing_key=SIGNING_KEY,
        config=ExportConfig(gguf_types=list(GGUF_TYPES)),
    )
    assert again.reused and again.path == export_result.path
    assert again.signature == export_result.signature and again.fingerprint == export_result.fingerprint
    assert time.perf_counter() - started < 10
    assert export_result.path.name == sha256_file(trained.checkpoint / "manifest.json")[:24]


def test_a_damaged_export_is_rebuilt_not_reused(trained, tmp_path):
    cfg = ExportConfig(formats=["native"], watermark={"enabled": False})
    kw = dict(run_id=RUN_ID, dataset_version=DATASET_VERSION, config_hash=CONFIG_HASH, signing_key=SIGNING_KEY,
              config=cfg)
    first = export_checkpoint(trained.checkpoint, trained.tokenizer, None, tmp_path, **kw)
    assert first.watermark is None and not first.reused
    (first.path / "native" / "tokenizer.model").write_bytes(b"damaged")
    second = export_checkpoint(trained.checkpoint, trained.tokenizer, None, tmp_path, **kw)
    assert not second.reused and verify_export(second.path, SIGNING_KEY).ok
    assert [p.name for p in tmp_path.iterdir()] == [first.path.name]  # no temporary leftovers


def test_model_card_has_metrics_lineage_use_and_limitations(export_result):
    card = export_result.model_card_path.read_text()
    for needle in ("## Lineage", RUN_ID, DATASET_VERSION, export_result.fingerprint, "val_ppl", "24.5",
                   "## Intended use", "## Limitations", "## Parity", "tensorrt"):
        assert needle in card, needle


def test_model_ready_payload_references_files_in_the_store(export_result):
    store = ArtifactStore(export_result.path.parent.parent)
    payload = model_ready_payload(export_result, store, {"val_loss": 3.2})
    assert isinstance(payload, ModelReady)
    assert {"native", "hf", "onnx", "onnx_kv", "gguf", "gguf_q8_0", "gguf_f16", "gguf_f32"} <= set(payload.formats)
    assert "tensorrt" not in payload.formats
    for ref in (*payload.formats.values(), payload.manifest, payload.model_card):
        assert store.open_verified(ref)
    assert payload.signature == export_result.signature and payload.fingerprint == export_result.fingerprint
    assert payload.lineage.checkpoint_step == 200 and payload.lineage.run_id == RUN_ID
    wire = encode(envelope(payload, producer=Producer(service="exporter", instance="t"), run_id=RUN_ID))
    assert decode(wire, ModelReady).payload == payload


def test_native_stores_tied_weights_once_with_provenance_metadata(trained, tmp_path):
    write_native(tmp_path / "native", trained.state, trained.config, trained.tokenizer, {"helox.fingerprint": "x"})
    tensors, meta = read_native_tensors(tmp_path / "native")
    assert "lm_head.weight" not in tensors and meta["helox.fingerprint"] == "x"


def test_an_offline_export_has_no_config_hash_rather_than_a_made_up_one(trained, tmp_path):
    """config_hash=None (helox export: no run) leaves the field out of the lineage and of every
    file's metadata; the model card and verify say so; nothing carries an all-zero digest."""
    cfg = ExportConfig(formats=["native", "hf", "onnx", "gguf"], gguf_types=["f16"], onnx_kv_cache=False,
                       watermark={"enabled": False})
    res = export_checkpoint(trained.checkpoint, trained.tokenizer, None, tmp_path, run_id="offline",
                            dataset_version=DATASET_VERSION, config_hash=None, signing_key=SIGNING_KEY, config=cfg)
    assert "config_hash" not in res.lineage and "config_hash" not in res.manifest["lineage"]
    manifest_text = (res.path / "manifest.json").read_text()
    assert "0" * 64 not in manifest_text and "None" not in manifest_text
    assert "helox.config_hash" not in read_native_tensors(res.path / "native")[1]
    assert "helox.config_hash" not in json.loads((res.path / "hf" / "config.json").read_text())["helox"]
    from services.exporter.onnx_export import read_onnx_metadata

    assert "helox.config_hash" not in read_onnx_metadata(res.path / "onnx" / "model.onnx")
    _, fields = read_gguf(res.path / "gguf" / "model-f16.gguf")
    assert "general.helox.config_hash" not in fields and fields["general.helox.run_id"] == "offline"
    assert f"| config_hash | {NO_CONFIG_HASH} |" in res.model_card_path.read_text()
    report = verify_export(res.path, SIGNING_KEY)
    assert report.ok, report.summary()
    assert NO_CONFIG_HASH in next(c.detail for c in report.checks if c.name == "manifest")
    with pytest.raises(ExportError, match="offline export"):
        model_ready_payload(res, ArtifactStore(tmp_path))


def test_an_export_with_a_run_config_hash_carries_it_and_verify_does_not_call_it_offline(export_result):
    assert export_result.lineage["config_hash"] == CONFIG_HASH
    report = verify_export(export_result.path, SIGNING_KEY, check_watermark=False, check_loads=False)
    assert NO_CONFIG_HASH not in next(c.detail for c in report.checks if c.name == "manifest")
    assert f"| config_hash | `{CONFIG_HASH}` |" in export_result.model_card_path.read_text()


def test_gguf_types_argument_overrides_the_config(trained, tmp_path):
    cfg = ExportConfig(formats=["native", "gguf"], watermark={"enabled": False})  # native: the fingerprint's source
    res = export_checkpoint(trained.checkpoint, trained.tokenizer, None, tmp_path, run_id=RUN_ID,
                            dataset_version=DATASET_VERSION, config_hash=CONFIG_HASH, signing_key=SIGNING_KEY,
                            config=cfg, gguf_types=["bf16", "f32"])
    assert sorted(res.formats["gguf"]["files"]) == ["bf16", "f32"]
    assert res.manifest["options"]["gguf_types"] == ["bf16", "f32"]
    with pytest.raises(ExportError, match=r"q4_0.*gguf_types"):
        export_checkpoint(trained.checkpoint, trained.tokenizer, None, tmp_path, run_id=RUN_ID,
                          dataset_version=DATASET_VERSION, config_hash=CONFIG_HASH, signing_key=SIGNING_KEY,
                          config=cfg, gguf_types=["q4_0"])
