"""Load a Helox export the way an outside consumer should: verify first, then run it.

Verification (before any model file is opened):
1. the manifest's bytes match the SHA-256 its reference (or event) promises, when given;
2. HMAC-SHA256 (key: HELOX_SIGNING_KEY) over the manifest's canonical JSON equals the signature
   (from the ModelReady event, else signature.json);
3. every file the manifest lists exists with its size and SHA-256.

Then the ONNX export runs in onnxruntime (KV-cache graph when present), or the Hugging Face
export in transformers, with the sentencepiece tokenizer; answers use greedy decoding.

Depends on `contracts`, the runtimes and the standard library only: no Helox internals.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol
from urllib.parse import unquote, urlparse

import numpy as np

from contracts import ModelReady

Runtime = Literal["onnx", "hf"]


class ExportVerificationError(Exception):
    """The export is not what its signer published: do not load it."""


def canonical_json(obj: Any) -> bytes:
    """The signed form: sorted keys, no whitespace, UTF-8 (as the exporter writes it)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def signing_key_from_env() -> bytes:
    key = os.environ.get("HELOX_SIGNING_KEY", "")
    if not key:
        raise ExportVerificationError("HELOX_SIGNING_KEY is not set: Cyrex needs the key to verify exports")
    return key.encode()


def verify_export_dir(export_dir: str | Path, key: str | bytes, *, signature: str | None = None,
                      manifest_sha256: str | None = None) -> dict[str, Any]:
    """Check signature and every digest; return the manifest or raise ExportVerificationError."""
    export_dir = Path(export_dir)
    key = key.encode() if isinstance(key, str) else key
    manifest_path = export_dir / "manifest.json"
    try:
        raw = manifest_path.read_bytes()
        manifest = json.loads(raw)
    except (OSError, ValueError) as exc:
        raise ExportVerificationError(f"cannot read {manifest_path}: {exc}") from exc
    if manifest_sha256 is not None and hashlib.sha256(raw).hexdigest() != manifest_sha256:
        raise ExportVerificationError(f"{manifest_path} does not match the SHA-256 in the event")
    if signature is None:
        try:
            signature = json.loads((export_dir / "signature.json").read_text())["signature"]
        except (OSError, ValueError, KeyError) as exc:
            raise ExportVerificationError(f"no signature given and signature.json unreadable: {exc}") from exc
    expected = hmac.new(key, canonical_json(manifest), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected, str(signature).lower()):
        raise ExportVerificationError("HMAC-SHA256 signature mismatch: wrong key, or the manifest was altered")
    for rel, entry in sorted(manifest.get("files", {}).items()):
        f = export_dir / rel
        if not f.is_file():
            raise ExportVerificationError(f"{rel} is listed in the manifest but missing")
        if f.stat().st_size != entry["bytes"] or _sha256_file(f) != entry["sha256"]:
            raise ExportVerificationError(f"{rel} does not match its SHA-256 in the signed manifest")
    return manifest


def export_dir_of(event: ModelReady, *, allowed_root: str | Path | None = None) -> Path:
    """The local export directory of a ModelReady event (file:// URIs only, optionally confined)."""
    parsed = urlparse(event.manifest.uri)
    if parsed.scheme != "file":
        raise ExportVerificationError(f"unsupported manifest URI {event.manifest.uri!r}: this loader reads file:// only")
    path = Path(unquote(parsed.path)).resolve()
    if allowed_root is not None:
        root = Path(allowed_root).resolve()
        if root not in path.parents:
            raise ExportVerificationError(f"{path} is outside the allowed root {root}")
    return path.parent


class LanguageModel(Protocol):
    manifest: dict[str, Any]
    export_dir: Path

    @property
    def context_length(self) -> int: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def next_token_logits(self, ids: list[int]) -> np.ndarray: ...

    def answer(self, prompt: str, max_new_tokens: int = 32) -> str: ...


@dataclass
class _Tokenizer:
    path: Path

    def __post_init__(self) -> None:
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor(model_file=str(self.path))
        self.eos = self.sp.eos_id()

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)  # Helox trains without BOS at document starts

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids)


class OnnxModel:
    """The ONNX export in onnxruntime: the KV-cache graph (prompt once, then one token per step)
    when the export has it, else the plain logits graph over the whole sequence.

    Feeds what the session declares (`session.get_inputs()`): input_ids, and attention_mask /
    position_ids when the graph takes them; the KV graph's cache is either optimum's per-layer
    `past_key_values.N.key/value` [batch, kv_heads, past, head_dim] -> `present.N.key/value`, or
    (exports before that) `past_keys`/`past_values` [layers, batch, kv_heads, past, head_dim] ->
    `present_keys`/`present_values`."""

    def __init__(self, export_dir: Path, manifest: dict[str, Any]) -> None:
        import onnxruntime as ort

        self.manifest = manifest
        self.export_dir = export_dir
        fmt = manifest["formats"]["onnx"]
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        self.kv = fmt.get("kv_cache") is not None
        graph = fmt["kv_cache"] if self.kv else fmt["main"]
        self.session = ort.InferenceSession(str(export_dir / graph), opts, providers=["CPUExecutionProvider"])
        self.tokenizer = _Tokenizer(export_dir / _tokenizer_rel(manifest, "onnx"))
        self.inputs = {value.name for value in self.session.get_inputs()}
        self.outputs = [value.name for value in self.session.get_outputs()]
        c = manifest["model_config"]
        head_dim = c.get("head_dim") or c["d_model"] // c["n_head"]
        if "past_keys" in self.inputs:  # the stacked cache of older exports
            empty = np.zeros((c["n_layer"], 1, c["n_kv_head"], 0, head_dim), dtype=np.float32)
            self.empty_past = {"past_keys": empty, "past_values": empty}
        else:
            empty = np.zeros((1, c["n_kv_head"], 0, head_dim), dtype=np.float32)
            self.empty_past = {name: empty for name in self.inputs if name.startswith("past_key_values.")}
        if self.kv and not self.empty_past:
            raise ExportVerificationError(f"{graph} has no KV-cache inputs (inputs: {sorted(self.inputs)})")
        # Which input each cache output feeds on the next step.
        self.next_past = {out: _past_name(out) for out in self.outputs if out != "logits"}
        unknown = sorted(set(self.next_past.values()) - set(self.empty_past))
        if self.kv and unknown:
            raise ExportVerificationError(f"{graph}: outputs {unknown} match no cache input")

    @property
    def context_length(self) -> int:
        return int(self.manifest["model_config"]["max_seq_len"])

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    def _feeds(self, new_ids: list[int], past_len: int, past: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feeds = {"input_ids": np.asarray([new_ids], dtype=np.int64)}
        if "attention_mask" in self.inputs:  # covers the cached tokens and the new ones
            feeds["attention_mask"] = np.ones((1, past_len + len(new_ids)), dtype=np.int64)
        if "position_ids" in self.inputs:
            feeds["position_ids"] = np.arange(past_len, past_len + len(new_ids), dtype=np.int64)[None]
        return {**feeds, **past}

    def next_token_logits(self, ids: list[int]) -> np.ndarray:
        return self.session.run(["logits"], self._feeds(ids, 0, self.empty_past if self.kv else {}))[0][0, -1]

    def generate_ids(self, ids: list[int], max_new_tokens: int) -> list[int]:
        out: list[int] = []
        if not self.kv:
            for _ in range(max_new_tokens):
                tok = int(self.next_token_logits(ids + out).argmax())
                out.append(tok)
                if tok == self.tokenizer.eos:
                    break
            return out
        feeds = self._feeds(ids, 0, self.empty_past)
        past_len = len(ids)
        for _ in range(max_new_tokens):
            values = dict(zip(self.outputs, self.session.run(self.outputs, feeds), strict=True))
            tok = int(values["logits"][0, -1].argmax())
            out.append(tok)
            if tok == self.tokenizer.eos:
                break
            feeds = self._feeds([tok], past_len, {self.next_past[k]: v for k, v in values.items() if k != "logits"})
            past_len += 1
        return out

    def answer(self, prompt: str, max_new_tokens: int = 32) -> str:
        ids = self.generate_ids(self.tokenizer.encode(prompt), max_new_tokens)
        return self.tokenizer.decode([i for i in ids if i != self.tokenizer.eos])


def _past_name(output: str) -> str:
    """The cache input an output feeds: present.N.key -> past_key_values.N.key, present_keys -> past_keys."""
    if output.startswith("present."):
        return "past_key_values." + output.removeprefix("present.")
    return output.replace("present_", "past_", 1)


class HFModel:
    """The Hugging Face export through transformers (AutoModelForCausalLM + AutoTokenizer)."""

    def __init__(self, export_dir: Path, manifest: dict[str, Any]) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.manifest = manifest
        self.export_dir = export_dir
        self._torch = torch
        path = export_dir / manifest["formats"]["hf"]["path"]
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(path)

    @property
    def context_length(self) -> int:
        return int(self.manifest["model_config"]["max_seq_len"])

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def next_token_logits(self, ids: list[int]) -> np.ndarray:
        with self._torch.no_grad():
            return self.model(self._torch.tensor([ids])).logits[0, -1].numpy()

    def generate_ids(self, ids: list[int], max_new_tokens: int) -> list[int]:
        x = self._torch.tensor([ids])
        with self._torch.no_grad():
            out = self.model.generate(x, attention_mask=self._torch.ones_like(x), max_new_tokens=max_new_tokens,
                                      do_sample=False, pad_token_id=self.tokenizer.pad_token_id)
        return out[0, len(ids):].tolist()

    def answer(self, prompt: str, max_new_tokens: int = 32) -> str:
        ids = self.generate_ids(self.tokenizer.encode(prompt, add_special_tokens=False), max_new_tokens)
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def _tokenizer_rel(manifest: Mapping[str, Any], fmt: str) -> str:
    if manifest.get("tokenizer"):
        return str(manifest["tokenizer"])
    hf = manifest.get("formats", {}).get("hf")
    if hf:
        return f"{hf['path']}/tokenizer.model"
    raise ExportVerificationError(f"the export has no tokenizer to run its {fmt} model with")


def load_export(export_dir: str | Path, key: str | bytes, *, runtime: Runtime = "onnx",
                signature: str | None = None, manifest_sha256: str | None = None) -> OnnxModel | HFModel:
    """Verify an export directory, then load it in the chosen runtime."""
    export_dir = Path(export_dir)
    manifest = verify_export_dir(export_dir, key, signature=signature, manifest_sha256=manifest_sha256)
    if runtime not in manifest.get("formats", {}):
        raise ExportVerificationError(f"the export has no {runtime!r} format (has {sorted(manifest.get('formats', {}))})")
    return OnnxModel(export_dir, manifest) if runtime == "onnx" else HFModel(export_dir, manifest)


def load_from_event(event: ModelReady, key: str | bytes, *, runtime: Runtime = "onnx",
                    allowed_root: str | Path | None = None) -> OnnxModel | HFModel:
    """Verify and load the export a ModelReady event announces (signature and manifest digest from the event)."""
    export_dir = export_dir_of(event, allowed_root=allowed_root)
    model = load_export(export_dir, key, runtime=runtime, signature=event.signature,
                        manifest_sha256=event.manifest.sha256)
    if model.manifest.get("fingerprint") != event.fingerprint:
        raise ExportVerificationError("the manifest's fingerprint differs from the event's")
    return model
