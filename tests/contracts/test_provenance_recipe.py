"""contracts/PROVENANCE.md is enough to verify an export: its recipes, re-implemented here
from the text with hashlib, hmac, struct and json alone, give what the exporter computes."""

from __future__ import annotations

import hashlib
import hmac
import json
import struct

import numpy as np
import torch

from services.exporter import provenance, watermark

KEY = "s3cret-ключ"  # HELOX_SIGNING_KEY is text: its UTF-8 bytes are the key


# --- the recipes, from the document -----------------------------------------------------------


def doc_key_bytes(key: str) -> bytes:
    return key.encode("utf-8")


def doc_key_id(key: bytes) -> str:
    return hashlib.sha256(b"helox-key-id" + b"\x00" + key).hexdigest()[:16]


def doc_watermark_key(signing_key: bytes) -> bytes:
    return hmac.new(signing_key, b"helox-watermark-key/1", hashlib.sha256).hexdigest().encode("ascii")


def doc_canonical_json(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")


def doc_signature(manifest_bytes: bytes, key: bytes) -> str:
    return hmac.new(key, manifest_bytes, hashlib.sha256).hexdigest()


def doc_fingerprint(tensors: dict[str, tuple[str, list[int], bytes]]) -> str:
    """tensors: name -> (dtype code, shape, row-major little-endian element bytes)."""
    h = hashlib.sha256(b"helox-fingerprint/1" + b"\x00")
    for name in sorted(tensors):
        dtype, shape, data = tensors[name]
        head = json.dumps([name, dtype, shape], separators=(",", ":")).encode()
        h.update(struct.pack("<Q", len(head)) + head + struct.pack("<Q", len(data)))
        h.update(data)
    return h.hexdigest()


def bf16(values: list[float]) -> bytes:
    """BF16 per the document: the upper 16 bits of each float32 pattern, little-endian."""
    return b"".join(struct.pack("<H", struct.unpack("<I", struct.pack("<f", v))[0] >> 16) for v in values)


# --- the checks -------------------------------------------------------------------------------


def test_key_id_and_watermark_key_follow_the_document() -> None:
    key = doc_key_bytes(KEY)
    assert provenance.key_id(KEY) == doc_key_id(key) == provenance.key_id(key)
    wm = watermark.derive_watermark_key(KEY)
    assert wm.encode() == doc_watermark_key(key)
    assert provenance.key_id(wm) == doc_key_id(doc_watermark_key(key))


def test_signature_is_hmac_sha256_over_the_canonical_manifest_bytes() -> None:
    manifest = {
        "model_id": "r1-s10-abc", "fingerprint": "0" * 64, "format": "helox-export/1",
        "files": {"native/model.safetensors": {"sha256": "1" * 64, "bytes": 12}},
        "metrics": {"val_loss": 1.0, "tiny": 1e-05, "big": 1e16, "ppl": 0.1},
        "note": "é\n\x01 \"quoted\" \\ \u2028", "n": 3, "ok": True, "none": None, "list": [2, 1],
    }
    canonical = doc_canonical_json(manifest)
    assert canonical == provenance.canonical_json(manifest)
    # The document's spelling of floats, escapes and order, stated literally.
    assert b'"metrics":{"big":1e+16,"ppl":0.1,"tiny":1e-05,"val_loss":1.0}' in canonical
    assert '"note":"é\\n\\u0001 \\"quoted\\" \\\\ \u2028"'.encode() in canonical
    assert canonical.startswith(b'{"files":')
    key = doc_key_bytes(KEY)
    assert doc_signature(canonical, key) == provenance.sign(manifest, KEY)
    assert provenance.verify_signature(json.loads(canonical), doc_signature(canonical, key), KEY)
    assert not provenance.verify_signature({**manifest, "n": 4}, doc_signature(canonical, key), KEY)


def test_fingerprint_follows_the_document_for_every_dtype_and_shape() -> None:
    f32 = [1.0, -2.5, 0.15625, 3.0, 1e-3, 7.0]
    tensors_torch = {
        "layers.0.mlp.up_proj.weight": torch.tensor(f32, dtype=torch.float32).reshape(2, 3),
        "embed_tokens.weight": torch.tensor([1.0, -2.5, 0.15625, 3.0], dtype=torch.bfloat16).reshape(2, 2),
        "norm.weight": torch.tensor([0.5, 2.0], dtype=torch.float16),
        "step": torch.tensor(7, dtype=torch.int64),
        "mask": torch.tensor([True, False, True]),
        "empty": torch.zeros((0, 4), dtype=torch.float32),
        "counts": np.array([[1, -2], [3, 4]], dtype=np.int32),
    }
    by_hand = {
        "layers.0.mlp.up_proj.weight": ("F32", [2, 3], struct.pack("<6f", *f32)),
        "embed_tokens.weight": ("BF16", [2, 2], bf16([1.0, -2.5, 0.15625, 3.0])),
        "norm.weight": ("F16", [2], struct.pack("<2e", 0.5, 2.0)),
        "step": ("I64", [], struct.pack("<q", 7)),
        "mask": ("BOOL", [3], bytes([1, 0, 1])),
        "empty": ("F32", [0, 4], b""),
        "counts": ("I32", [2, 2], struct.pack("<4i", 1, -2, 3, 4)),
    }
    assert provenance.fingerprint(tensors_torch) == doc_fingerprint(by_hand)
    # Row-major order and shape both count: a transposed copy has another fingerprint.
    swapped = dict(tensors_torch, **{"layers.0.mlp.up_proj.weight": tensors_torch["layers.0.mlp.up_proj.weight"].T})
    assert provenance.fingerprint(swapped) != provenance.fingerprint(tensors_torch)
    # A non-contiguous tensor is fingerprinted in row-major order of its logical layout.
    t = torch.tensor(f32, dtype=torch.float32).reshape(3, 2).T
    assert provenance.fingerprint({"x": t}) == doc_fingerprint({"x": ("F32", [2, 3], struct.pack("<6f", *t.reshape(-1).tolist()))})


def test_the_fingerprinted_set_leaves_out_a_tied_head() -> None:
    state = {"embed_tokens.weight": torch.ones(2, 2), "lm_head.weight": torch.ones(2, 2), "norm.weight": torch.ones(2)}
    tied = provenance.canonical_tensors(state, tied=True)
    assert sorted(tied) == ["embed_tokens.weight", "norm.weight"]
    assert provenance.fingerprint(tied) == doc_fingerprint({
        "embed_tokens.weight": ("F32", [2, 2], struct.pack("<4f", 1, 1, 1, 1)),
        "norm.weight": ("F32", [2], struct.pack("<2f", 1, 1)),
    })
