"""`verify_export(path, key)`: is this export what the exporter wrote, and whose is it?

Checks, each reported pass / fail / skipped with a detail line:

- manifest     manifest.json is readable and in the export format
- signature    signature.json's HMAC-SHA256 over the manifest's canonical JSON (needs the key)
- digests      every file listed in the manifest exists with its size and SHA-256, and no
               unlisted file sits in the directory
- fingerprint  the tensor fingerprint recomputed from the weights equals the manifest's, and
               every format's embedded metadata carries it
- watermark    the keyed watermark is detected in the weights (needs the key)
- loads        each GGUF file loads in llama-cpp-python as a user loads it (stock settings, in a
               child process: a crash fails the check, naming the file and the workaround) and
               each ONNX graph runs in onnxruntime on a short prompt
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from shared.artifacts import sha256_file
from shared.model import ModelConfig

from .provenance import NO_CONFIG_HASH, fingerprint, key_id, verify_signature

EXPORT_FORMAT = "helox-export/1"
MANIFEST_FILE = "manifest.json"
SIGNATURE_FILE = "signature.json"
Status = Literal["pass", "fail", "skipped"]


@dataclass(frozen=True)
class CheckResult:
    name: str
    status: Status
    detail: str = ""


@dataclass
class VerifyReport:
    """Per-check outcome of `verify_export`; `ok` when nothing failed."""

    path: str
    checks: list[CheckResult] = field(default_factory=list)
    watermark: dict[str, Any] | None = None

    @property
    def ok(self) -> bool:
        return all(c.status != "fail" for c in self.checks)

    @property
    def failed(self) -> list[str]:
        return [c.name for c in self.checks if c.status == "fail"]

    def status(self, name: str) -> Status | None:
        return next((c.status for c in self.checks if c.name == name), None)

    def as_dict(self) -> dict[str, Any]:
        return {"path": self.path, "ok": self.ok, "failed": self.failed,
                "checks": [asdict(c) for c in self.checks], "watermark": self.watermark}

    def summary(self) -> str:
        """Lines for a terminal: one per check, then the verdict."""
        lines = [f"{c.status.upper():8} {c.name:12} {c.detail}" for c in self.checks]
        lines.append("OK" if self.ok else f"FAILED: {', '.join(self.failed)}")
        return "\n".join(lines)


def read_manifest(path: Path) -> tuple[dict[str, Any], bytes]:
    data = (path / MANIFEST_FILE).read_bytes()
    manifest = json.loads(data)
    if not isinstance(manifest, dict) or manifest.get("format") != EXPORT_FORMAT:
        raise ValueError(f"format {manifest.get('format') if isinstance(manifest, dict) else None!r}, "
                         f"expected {EXPORT_FORMAT!r}")
    return manifest, data


def _check_signature(path: Path, manifest: dict[str, Any], key: str | bytes | None) -> CheckResult:
    if key is None:
        return CheckResult("signature", "skipped", "no key given (HELOX_SIGNING_KEY)")
    sig_path = path / SIGNATURE_FILE
    if not sig_path.is_file():
        return CheckResult("signature", "fail", f"{SIGNATURE_FILE} missing")
    try:
        sig = json.loads(sig_path.read_text())
        signature = str(sig["signature"])
    except (ValueError, KeyError, TypeError) as exc:
        return CheckResult("signature", "fail", f"{SIGNATURE_FILE} unreadable: {exc}")
    if verify_signature(manifest, signature, key):
        return CheckResult("signature", "pass", f"HMAC-SHA256 with key {key_id(key)}")
    other = sig.get("key_id")
    why = f"signed with key {other}, not {key_id(key)}" if other and other != key_id(key) else "manifest or signature altered"
    return CheckResult("signature", "fail", f"HMAC mismatch: {why}")


def _check_digests(path: Path, manifest: dict[str, Any]) -> CheckResult:
    files = manifest.get("files") or {}
    problems = []
    for rel, entry in sorted(files.items()):
        f = path / rel
        if not f.is_file():
            problems.append(f"{rel}: missing")
        elif f.stat().st_size != entry.get("bytes"):
            problems.append(f"{rel}: size {f.stat().st_size} != {entry.get('bytes')}")
        elif sha256_file(f) != entry.get("sha256"):
            problems.append(f"{rel}: sha256 differs")
    listed = set(files) | {MANIFEST_FILE, SIGNATURE_FILE}
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = f.relative_to(path).as_posix()
        if rel not in listed:
            problems.append(f"{rel}: not in the manifest")
    if problems:
        return CheckResult("digests", "fail", "; ".join(problems[:10]) + (" ..." if len(problems) > 10 else ""))
    return CheckResult("digests", "pass", f"{len(files)} files match")


def _weights(path: Path, manifest: dict[str, Any], config: ModelConfig):
    """The model's tensors (own names) from the native file, else the HF one."""
    formats = manifest.get("formats", {})
    if "native" in formats and (path / formats["native"]["main"]).is_file():
        from .native import read_native_tensors

        return read_native_tensors(path / formats["native"]["main"])[0], "native"
    if "hf" in formats and (path / formats["hf"]["main"]).is_file():
        from safetensors.torch import load_file

        from .hf import hf_tensors_to_canonical

        return hf_tensors_to_canonical(load_file(str(path / formats["hf"]["main"])), config), "hf"
    return None, None


def embedded_fingerprints(path: Path, manifest: dict[str, Any]) -> dict[str, str | None]:
    """The fingerprint each written file carries in its own metadata."""
    formats = manifest.get("formats", {})
    out: dict[str, str | None] = {}
    key = "helox.fingerprint"
    if "native" in formats:
        from .native import read_native_tensors

        f = path / formats["native"]["main"]
        out[formats["native"]["main"]] = read_native_tensors(f)[1].get(key) if f.is_file() else None
    if "hf" in formats:
        from .hf import read_hf_metadata

        d = path / formats["hf"]["path"]
        out[formats["hf"]["main"]] = read_hf_metadata(d).get(key) if d.is_dir() else None
        cfg = d / "config.json"
        out[f"{formats['hf']['path']}/config.json"] = (
            json.loads(cfg.read_text()).get("helox", {}).get(key) if cfg.is_file() else None)
    if "onnx" in formats:
        from .onnx_export import read_onnx_metadata

        for rel in filter(None, (formats["onnx"].get("main"), formats["onnx"].get("kv_cache"))):
            out[rel] = read_onnx_metadata(path / rel).get(key) if (path / rel).is_file() else None
    if "gguf" in formats:
        import gguf

        for rel in formats["gguf"].get("files", {}).values():
            if not (path / rel).is_file():
                out[rel] = None
                continue
            field_ = gguf.GGUFReader(str(path / rel)).get_field("general." + key)
            out[rel] = field_.contents() if field_ is not None else None
    return out


def _check_fingerprint(path: Path, manifest: dict[str, Any], config: ModelConfig) -> tuple[CheckResult, Any]:
    expected = manifest.get("fingerprint")
    tensors, source = _weights(path, manifest, config)
    if tensors is None:
        return CheckResult("fingerprint", "fail", "no native or hf weights to fingerprint"), None
    actual = fingerprint(tensors)
    if actual != expected:
        return CheckResult("fingerprint", "fail", f"{source} weights hash to {actual[:16]}..., "
                                                  f"manifest says {str(expected)[:16]}..."), tensors
    wrong = {rel: fp for rel, fp in embedded_fingerprints(path, manifest).items() if fp != expected}
    if wrong:
        shown = ", ".join(f"{rel} ({'none' if fp is None else fp[:12] + '...'})" for rel, fp in sorted(wrong.items()))
        return CheckResult("fingerprint", "fail", f"metadata disagrees in {shown}"), tensors
    return CheckResult("fingerprint", "pass", f"{expected[:16]}... ({source} weights and every file's metadata)"), tensors


def _check_watermark(manifest: dict[str, Any], tensors, config: ModelConfig, key: str | bytes | None,
                     watermark_key: str | bytes | None) -> tuple[CheckResult, dict[str, Any] | None]:
    from .watermark import derive_watermark_key, detect_watermark

    info = manifest.get("watermark")
    if not info:
        return CheckResult("watermark", "skipped", "the export carries no watermark"), None
    if watermark_key is None and key is None:
        return CheckResult("watermark", "skipped", "no key given"), None
    if tensors is None:
        return CheckResult("watermark", "fail", "no weights to examine"), None
    wkey = watermark_key if watermark_key is not None else derive_watermark_key(key)
    if config.tie_embeddings and "lm_head.weight" not in tensors:
        tensors = {**tensors, "lm_head.weight": tensors["embed_tokens.weight"]}
    res = detect_watermark(tensors, config, wkey, max_false_positive=float(info.get("max_false_positive", 1e-6)))
    detail = f"z={res.z:.1f}, false-positive bound {res.fp_bound:.2g} over {res.units} units (key {res.key_id})"
    return CheckResult("watermark", "pass" if res.detected else "fail", detail), res.as_dict()


def _check_loads(path: Path, manifest: dict[str, Any]) -> CheckResult:
    import numpy as np

    from . import gguf_export, onnx_export

    formats = manifest.get("formats", {})
    config = manifest.get("model_config") or {}
    done, problems, skipped = [], [], []
    gguf_files = list((formats.get("gguf") or {}).get("files", {}).values())
    missing = gguf_export.llama_cpp_missing() if gguf_files else None
    if missing:
        skipped.append(f"gguf: {missing}")
        gguf_files = []
    for rel in gguf_files:
        try:
            runtime = gguf_export.load_check(path / rel, int(config.get("vocab_size", 8)))
            done.append(f"{rel} ({runtime})")
        except Exception as exc:
            problems.append(f"{rel}: {exc}")
    onnx = formats.get("onnx") or {}
    for rel in filter(None, (onnx.get("main"), onnx.get("kv_cache"))):
        try:
            ids = np.array([[4, 5, 6]], dtype=np.int64) % max(1, int(config.get("vocab_size", 8)))
            logits = onnx_export.run_graph(path / rel, ids)
            if not np.isfinite(logits).all():
                raise ValueError("non-finite logits")
            done.append(f"{rel} (onnxruntime)")
        except Exception as exc:
            problems.append(f"{rel}: {type(exc).__name__}: {exc}")
    if problems:
        return CheckResult("loads", "fail", "; ".join(problems))
    if not done:
        return CheckResult("loads", "skipped", "; ".join(skipped) or "no GGUF or ONNX file in the export")
    return CheckResult("loads", "pass", "; ".join(done + skipped))


def verify_export(path: str | Path, key: str | bytes | None, *, watermark_key: str | bytes | None = None,
                  check_watermark: bool = True, check_loads: bool = True) -> VerifyReport:
    """Check an export directory (or its manifest.json): digests, fingerprint, signature,
    watermark, and that its GGUF and ONNX files load (`check_loads`).

    `key` is the signing key (HELOX_SIGNING_KEY); the watermark key defaults to the one derived
    from it, as the exporter does. Never raises for a bad export: the report says what failed.
    """
    path = Path(path)
    if path.is_file():
        path = path.parent
    report = VerifyReport(str(path))
    try:
        manifest, _ = read_manifest(path)
    except (OSError, ValueError) as exc:
        report.checks.append(CheckResult("manifest", "fail", f"{path / MANIFEST_FILE}: {exc}"))
        for name in ("signature", "digests", "fingerprint", "watermark", "loads"):
            report.checks.append(CheckResult(name, "skipped", "no readable manifest"))
        return report
    lineage = manifest.get("lineage") or {}
    no_hash = "" if lineage.get("config_hash") else f"; {NO_CONFIG_HASH}"
    report.checks.append(CheckResult("manifest", "pass", f"{manifest.get('model_id')}{no_hash}"))
    report.checks.append(_check_signature(path, manifest, key))
    report.checks.append(_check_digests(path, manifest))
    try:
        config = ModelConfig(**manifest["model_config"])
        fp_check, tensors = _check_fingerprint(path, manifest, config)
    except Exception as exc:
        report.checks.append(CheckResult("fingerprint", "fail", f"{type(exc).__name__}: {exc}"))
        report.checks.append(CheckResult("watermark", "skipped", "weights unreadable"))
    else:
        report.checks.append(fp_check)
        if not check_watermark:
            report.checks.append(CheckResult("watermark", "skipped", "not requested"))
        else:
            try:
                wm_check, report.watermark = _check_watermark(manifest, tensors, config, key, watermark_key)
            except Exception as exc:
                wm_check = CheckResult("watermark", "fail", f"{type(exc).__name__}: {exc}")
            report.checks.append(wm_check)
    report.checks.append(_check_loads(path, manifest) if check_loads
                         else CheckResult("loads", "skipped", "not requested"))
    return report
