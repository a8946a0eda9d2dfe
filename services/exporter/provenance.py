"""Provenance of an export: the tensor fingerprint, the signed manifest and the model card.

- Fingerprint: SHA-256 over the tensors sorted by name, each as (name, dtype, shape, raw
  bytes), so it names the weights whatever file holds them. Every format carries it in its
  metadata, with the run, dataset, checkpoint, config hash and code version.
- Signature: HMAC-SHA256 over the canonical JSON of the export manifest (files, digests,
  fingerprint); the manifest is written in that same canonical form, so a consumer can
  check the HMAC over the file's bytes or over its re-serialised JSON alike.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import struct
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

SIGNATURE_ALGORITHM = "HMAC-SHA256"
NO_CONFIG_HASH = "no run config hash (offline export)"

# safetensors' dtype codes: one spelling for torch and numpy tensors alike.
_TORCH_CODES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
_NUMPY_CODES = {
    np.dtype("float64"): "F64", np.dtype("float32"): "F32", np.dtype("float16"): "F16",
    np.dtype("int64"): "I64", np.dtype("int32"): "I32", np.dtype("int16"): "I16", np.dtype("int8"): "I8",
    np.dtype("uint8"): "U8", np.dtype("bool"): "BOOL",
}


class SignatureKeyError(ValueError):
    """No signing key was given (argument or HELOX_SIGNING_KEY)."""


def _dtype_and_bytes(t: torch.Tensor | np.ndarray) -> tuple[str, tuple[int, ...], bytes]:
    if isinstance(t, torch.Tensor):
        t = t.detach().to("cpu").contiguous()
        code = _TORCH_CODES.get(t.dtype)
        if code is None:
            raise TypeError(f"cannot fingerprint a tensor of dtype {t.dtype}")
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        return code, tuple(t.shape), raw
    arr = np.ascontiguousarray(t)
    code = _NUMPY_CODES.get(arr.dtype)
    if code is None:
        raise TypeError(f"cannot fingerprint an array of dtype {arr.dtype}")
    return code, tuple(arr.shape), arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()


def fingerprint(tensors: Mapping[str, torch.Tensor | np.ndarray]) -> str:
    """SHA-256 over the sorted (name, dtype, shape, bytes) of the tensors, hex.

    Each record is length-prefixed, so no two different tensor sets share a byte stream.
    Independent of the order and the file the tensors came from; any changed weight,
    dtype or shape changes it.
    """
    h = hashlib.sha256(b"helox-fingerprint/1\0")
    for name in sorted(tensors):
        code, shape, raw = _dtype_and_bytes(tensors[name])
        head = json.dumps([name, code, list(shape)], separators=(",", ":")).encode()
        h.update(struct.pack("<Q", len(head)) + head + struct.pack("<Q", len(raw)))
        h.update(raw)
    return h.hexdigest()


def canonical_tensors(state: Mapping[str, torch.Tensor], *, tied: bool) -> dict[str, torch.Tensor]:
    """The tensors a fingerprint is taken over: the model's own names (`shared.model.Llama`),
    fp32 as trained, with the tied `lm_head.weight` left out (it is `embed_tokens.weight`)."""
    return {k: v for k, v in state.items() if not (tied and k == "lm_head.weight")}


# --- the signed manifest ---------------------------------------------------------------------


def canonical_json(obj: Any) -> bytes:
    """Canonical JSON bytes: sorted keys, no whitespace, UTF-8 (what is signed)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def key_bytes(key: str | bytes) -> bytes:
    if isinstance(key, str):
        key = key.encode()
    if not key:
        raise SignatureKeyError("the signing key is empty: set HELOX_SIGNING_KEY or pass signing_key")
    return key


def key_id(key: str | bytes) -> str:
    """A public id of a key (first 16 hex of SHA-256 over a domain tag and the key): tells
    which key signed a manifest without revealing it."""
    return hashlib.sha256(b"helox-key-id\0" + key_bytes(key)).hexdigest()[:16]


def sign(manifest: Mapping[str, Any], key: str | bytes) -> str:
    """HMAC-SHA256 over the manifest's canonical JSON, hex."""
    return hmac.new(key_bytes(key), canonical_json(manifest), hashlib.sha256).hexdigest()


def verify_signature(manifest: Mapping[str, Any], signature: str, key: str | bytes) -> bool:
    """Constant-time comparison of the manifest's HMAC with `signature`."""
    return hmac.compare_digest(sign(manifest, key), signature.strip().lower())


# --- metadata carried by every format --------------------------------------------------------


def provenance_metadata(
    *, fingerprint: str, model_id: str, run_id: str, dataset_version: str, checkpoint_step: int,
    checkpoint_digest: str, config_hash: str | None, code_version: str, watermark_key_id: str | None = None,
) -> dict[str, str]:
    """string -> string (what safetensors `__metadata__` and ONNX `metadata_props` hold).

    `config_hash` None (an offline export: no run, so no run config) leaves `helox.config_hash`
    out; readers say NO_CONFIG_HASH instead.
    """
    meta = {
        "helox.fingerprint": fingerprint,
        "helox.model_id": model_id,
        "helox.run_id": run_id,
        "helox.dataset_version": dataset_version,
        "helox.checkpoint_step": str(checkpoint_step),
        "helox.checkpoint_digest": checkpoint_digest,
        "helox.code_version": code_version,
    }
    if config_hash is not None:
        meta["helox.config_hash"] = config_hash
    if watermark_key_id:
        meta["helox.watermark_key_id"] = watermark_key_id
    return meta


# --- model card ------------------------------------------------------------------------------


def _fmt(v: Any) -> str:
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def model_card(
    *, model_id: str, provenance: Mapping[str, str], model_config: Mapping[str, Any], n_params: int,
    formats: Mapping[str, Any], metrics: Mapping[str, float] | None = None,
    watermark: Mapping[str, Any] | None = None, parity: Mapping[str, Any] | None = None,
    rag_template: Mapping[str, Any] | None = None, retrieval: Mapping[str, float] | None = None,
) -> str:
    """README.md of the export: what the model is, where it comes from, how to check it (and, for
    a model trained with retrieved context, its prompt template and retrieval gain)."""
    p = provenance
    lines = [
        f"# {model_id}",
        "",
        "A small decoder-only language model (Llama architecture: RMSNorm, RoPE, grouped-query "
        "attention, SwiGLU) trained by Helox.",
        "",
        "## Lineage",
        "",
        "| field | value |",
        "| --- | --- |",
    ]
    for key in ("run_id", "dataset_version", "checkpoint_step", "checkpoint_digest", "config_hash", "code_version",
                "fingerprint"):
        value = p.get("helox." + key)
        if value is None and key == "config_hash":
            lines.append(f"| {key} | {NO_CONFIG_HASH} |")
        else:
            lines.append(f"| {key} | `{value if value is not None else ''}` |")
    lines += ["", "## Architecture", "", f"{n_params:,} parameters.", "", "| hyper-parameter | value |", "| --- | --- |"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in model_config.items()]
    lines += ["", "## Metrics", ""]
    if metrics:
        lines += ["| metric | value |", "| --- | --- |"] + [f"| {k} | {_fmt(v)} |" for k, v in sorted(metrics.items())]
    else:
        lines.append("No evaluation metrics were attached to this export.")
    lines += _rag_section(rag_template, retrieval)
    lines += ["", "## Files", "", "| format | where | notes |", "| --- | --- | --- |"]
    for name, info in formats.items():
        if info.get("status") == "skipped":
            lines.append(f"| {name} | - | skipped: {info.get('reason', '')} |")
        else:
            lines.append(f"| {name} | `{info.get('path', '')}/` | {info.get('note', '')} |")
    if parity:
        lines += ["", "## Parity with the PyTorch model", "", "| check | result |", "| --- | --- |"]
        for name, res in parity.items():
            lines.append(f"| {name} | {_parity_summary(res)} |")
    lines += [
        "",
        "## Intended use",
        "",
        "Research and integration testing of the Helox pipeline, and downstream use by Cyrex after "
        "the signature and digests are verified. Text generation in the style of the training corpus.",
        "",
        "## Limitations",
        "",
        "- Small and trained on a narrow corpus: it produces fluent-looking but unreliable text; do not "
        "use its output as fact or for decisions about people.",
        "- No safety tuning, no instruction tuning.",
        "- Reduced-precision files (GGUF bf16, q8_0) trade a little accuracy for size; parity above says how much.",
    ]
    lines += _loading(formats)
    lines += [
        "",
        "## Verification",
        "",
        "`manifest.json` lists every file with its SHA-256 and the fingerprint; `signature.json` holds "
        f"its {SIGNATURE_ALGORITHM} (canonical JSON, key from HELOX_SIGNING_KEY). `helox verify PATH` checks "
        "digests, fingerprint, signature and watermark.",
    ]
    if watermark:
        lines += [
            "",
            f"The weights carry a keyed watermark (scheme `{watermark.get('scheme')}`, key id "
            f"`{watermark.get('key_id')}`), function-preserving: it changes no output beyond float rounding.",
        ]
    return "\n".join(lines) + "\n"


RETRIEVAL_ROWS = (
    ("loss_without", "nats/token", "base tokens, no context"),
    ("loss_with", "nats/token", "base tokens, retrieved chunks in front"),
    ("loss_random", "nats/token", "base tokens, random chunks of equal length in front (control)"),
    ("gain", "nats/token", "without - with"),
    ("control_gain", "nats/token", "without - random"),
    ("bpb_without", "bits/byte", "no context"),
    ("bpb_with", "bits/byte", "retrieved context"),
    ("bpb_random", "bits/byte", "random context"),
    ("gain_bpb", "bits/byte", "without - with"),
    ("control_gain_bpb", "bits/byte", "without - random"),
)


def _rag_section(template: Mapping[str, Any] | None, retrieval: Mapping[str, float] | None) -> list[str]:
    """The prompt template (rag_template.json) and the evaluator's retrieval gain, when there are."""
    if template is None and not retrieval:
        return []
    out = ["", "## Retrieval-augmented prompts", ""]
    if template is not None:
        o, c, d = template["chunk_open"], template["chunk_close"], template["doc_marker"]
        out += [
            "Trained with retrieved chunks packed in front of each window (the chunks and markers weigh "
            "nothing in the loss). Prompt it the same way: up to "
            f"{template['k']} chunks, best first, within {template['context_budget']:.0%} of a window of "
            f"{template.get('seq_len') or 'the model context'} tokens (markers included), then the marker "
            "and the text:",
            "",
            "```",
            f"{o}chunk 1{c}{o}chunk 2{c}{d}your text",
            "```",
            "",
            f"`{o}`, `{c}` and `{d}` are single tokens (sentencepiece user-defined symbols; special tokens "
            "of the HF tokenizer; USER_DEFINED in the GGUF vocabulary). `rag_template.json` holds the "
            "template, listed in the signed manifest.",
        ]
    if retrieval:
        rows = [(k, unit, what) for k, unit, what in RETRIEVAL_ROWS if k in retrieval]
        out += ["", "Retrieval gain on validation windows (the evaluator; the control shows what extra tokens "
                "alone are worth):", "", "| figure | value | unit | meaning |", "| --- | --- | --- | --- |"]
        out += [f"| {k} | {_fmt(retrieval[k])} | {unit} | {what} |" for k, unit, what in rows]
        out += [f"| {k} | {_fmt(v)} | | |" for k, v in sorted(retrieval.items()) if k not in dict.fromkeys(
            r[0] for r in RETRIEVAL_ROWS)]
    return out


def _loading(formats: Mapping[str, Any]) -> list[str]:
    """How to run the ONNX graphs and the GGUF files (what their checks did)."""
    from .gguf_export import AMX_LOAD, CRASH_HINT, STOCK_LOAD

    out = []
    onnx = formats.get("onnx") or {}
    if onnx and onnx.get("status") != "skipped":
        out += ["", "## Loading", "",
                "- ONNX (onnxruntime): `model.onnx` takes `input_ids`, `attention_mask` and `position_ids` "
                "([batch, sequence] int64; left-padded batches: `position_ids = max(cumsum(attention_mask) - 1, 0)`) "
                "and returns `logits`."]
        if onnx.get("kv_cache"):
            out.append("- `model_kv.onnx` adds the KV cache as optimum and onnxruntime-genai name it: "
                       "`past_key_values.N.key` / `.value` [batch, kv_heads, past, head_dim] in, `present.N.key` / "
                       "`.value` out, `attention_mask` over past + new tokens; feed past = 0 for the prompt.")
    gguf = formats.get("gguf") or {}
    if gguf and gguf.get("status") != "skipped":
        if not out:
            out += ["", "## Loading", ""]
        out.append(f"- GGUF (llama.cpp): every file was checked loaded as `{STOCK_LOAD}`, llama-cpp-python's "
                   f"default settings (a Q8_0 file on a CPU with AMX, where that load crashes, as `{AMX_LOAD}`).")
        if "q8_0" in (gguf.get("files") or {}):
            out.append(f"- `model-q8_0.gguf` may crash (SIGSEGV) loaded with stock settings: {CRASH_HINT}.")
    return out


def _parity_summary(res: Any) -> str:
    if not isinstance(res, Mapping):
        return str(res)
    if res.get("status") == "skipped":
        return f"skipped: {res.get('reason', '')}"
    parts = [f"{k}={_fmt(v)}" for k, v in res.items() if k != "passed" and not isinstance(v, Mapping)]
    parts += [f"{k}: {_parity_summary(v)}" for k, v in res.items() if isinstance(v, Mapping)]
    return ("passed" if res.get("passed") else "FAILED") + (" (" + "; ".join(parts) + ")" if parts else "")
