"""Fingerprint, signature, verification report, idempotency, model card and the ModelReady payload."""

from __future__ import annotations

import json
import shutil
import time

import pytest
import torch
from safetensors.torch import load_file

from contracts import ModelReady, decode, encode
from contracts.codec import envelope
from contracts.envelope import Producer
from services.exporter.config import ExportConfig
from services.exporter.export import export_checkpoint, model_ready_payload
from services.exporter.gguf_export import read_gguf
from services.exporter.hf import hf_tensors_to_canonical
from services.exporter.native import read_native_tensors, write_native
from services.exporter.provenance import canonical_json, fingerprint, sign, verify_signature
from services.exporter.verify import embedded_fingerprints, verify_export
from shared.artifacts import ArtifactStore, sha256_file
from shared.checkpoint import write_safetensors

from .conftest import CONFIG_HASH, DATASET_VERSION, RUN_ID, SIGNING_KEY


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
    assert len(embedded) == 8 and set(embedded.values()) == {fp}
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
    assert [c.status for c in report.checks] == ["pass"] * 5
    assert report.watermark["detected"] and report.watermark["z"] > 10


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
    assert report.failed == ["manifest"] and not report.ok
    assert "FAILED: manifest" in report.summary()


def test_export_is_idempotent_by_checkpoint_digest(export_result, trained):
    started = time.perf_counter()
    again = export_checkpoint(
        trained.checkpoint, trained.tokenizer, None, export_result.path.parent, run_id=RUN_ID,
        dataset_version=DATASET_VERSION, config_hash=CONFIG_HASH, signing_key=SIGNING_KEY,
        config=ExportConfig(quantisations=["f32", "f16", "q8_0"]),
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
