"""Held-out loss, perplexity and bits-per-byte per domain, with per-document NLL for paired tests.

Every validation token of a domain (up to a cap) is scored once, in order
(`shared.data.validation_batches`). Documents are recovered from the EOS ids the shards put
after each document, so each document's summed NLL, token count and UTF-8 bytes are kept:
the regression tests resample documents, and the same documents are scored for every model.

bits-per-byte = total NLL (nats) / ln 2 / total UTF-8 bytes of the decoded scored text; it is
comparable across tokenizers, unlike perplexity. Aggregates over domains are token-weighted
(total NLL / total tokens), i.e. what one pass over the whole validation split gives.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import sentencepiece as spm
import torch
import torch.nn.functional as F

from shared.data.dataset import validation_batches
from shared.data.manifest import MANIFEST_NAME, load_manifest

LN2 = math.log(2.0)


def manifest_file(manifest_path: str | Path) -> Path:
    """The manifest.json of a dataset given the file or its directory."""
    p = Path(manifest_path)
    return p / MANIFEST_NAME if p.is_dir() else p


def dataset_tokenizer(manifest_path: str | Path) -> spm.SentencePieceProcessor:
    """The sentencepiece model a dataset was tokenized with (path from its manifest)."""
    mpath = manifest_file(manifest_path)
    manifest = load_manifest(mpath)
    path = mpath.parent / manifest.tokenizer.path
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer {path} named by {mpath} is missing; re-run data prep for this dataset")
    return spm.SentencePieceProcessor(model_file=str(path))


@dataclass
class DomainHeldout:
    """One domain's scored validation tokens, totals and per-document sums."""

    domain: str
    tokens: int
    nll: float  # summed, nats
    bytes: int
    doc_nll: np.ndarray  # [n_docs] float64, nats
    doc_tokens: np.ndarray  # [n_docs] int64
    doc_bytes: np.ndarray  # [n_docs] int64

    @property
    def loss(self) -> float:
        return self.nll / self.tokens

    @property
    def ppl(self) -> float:
        return math.exp(self.loss)

    @property
    def bits_per_byte(self) -> float:
        return self.nll / LN2 / self.bytes if self.bytes else float("nan")

    def metrics(self) -> dict[str, float]:
        return {"loss": self.loss, "ppl": self.ppl, "bits_per_byte": self.bits_per_byte,
                "tokens": float(self.tokens), "bytes": float(self.bytes), "documents": float(self.doc_nll.size)}

    def to_json(self) -> dict[str, Any]:
        return {"domain": self.domain, "tokens": self.tokens, "nll": self.nll, "bytes": self.bytes,
                "doc_nll": self.doc_nll.tolist(), "doc_tokens": self.doc_tokens.tolist(),
                "doc_bytes": self.doc_bytes.tolist()}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> DomainHeldout:
        return cls(d["domain"], int(d["tokens"]), float(d["nll"]), int(d["bytes"]),
                   np.asarray(d["doc_nll"], dtype=np.float64), np.asarray(d["doc_tokens"], dtype=np.int64),
                   np.asarray(d["doc_bytes"], dtype=np.int64))


@dataclass
class HeldoutResult:
    domains: dict[str, DomainHeldout]
    seconds: float = 0.0
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def tokens(self) -> int:
        return sum(d.tokens for d in self.domains.values())

    @property
    def nll(self) -> float:
        return sum(d.nll for d in self.domains.values())

    @property
    def bytes(self) -> int:
        return sum(d.bytes for d in self.domains.values())

    @property
    def loss(self) -> float:
        return self.nll / self.tokens

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("nan")

    def metrics(self) -> dict[str, float]:
        """Headline metrics (token-weighted over domains)."""
        return {"val_loss": self.loss, "val_ppl": math.exp(self.loss),
                "bits_per_byte": self.nll / LN2 / self.bytes if self.bytes else float("nan"),
                "val_tokens": float(self.tokens), "val_tokens_per_s": self.tokens_per_s}

    def domain_metrics(self) -> dict[str, dict[str, float]]:
        return {name: d.metrics() for name, d in self.domains.items()}

    def to_json(self) -> dict[str, Any]:
        return {"seconds": self.seconds, "settings": self.settings,
                "domains": {k: v.to_json() for k, v in self.domains.items()}}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> HeldoutResult:
        return cls({k: DomainHeldout.from_json(v) for k, v in d["domains"].items()}, float(d["seconds"]),
                   dict(d.get("settings", {})))


@torch.inference_mode()
def token_nll(model: torch.nn.Module, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token NLL [B, T] (nats, fp32) of labels under the model."""
    logits = model(input_ids)  # [B, T, V]
    return F.cross_entropy(logits.float().transpose(1, 2), labels, reduction="none")  # [B, T]


def _documents(labels: np.ndarray, nll: np.ndarray, eos_id: int) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """Split a domain's label stream at EOS (kept with its document): per-doc NLL, tokens, ids."""
    ends = np.flatnonzero(labels == eos_id) + 1
    if ends.size == 0 or ends[-1] != labels.size:
        ends = np.append(ends, labels.size)  # a last document cut by the token cap
    starts = np.concatenate(([0], ends[:-1]))
    doc_nll = np.add.reduceat(nll, starts) if labels.size else np.zeros(0)
    return doc_nll.astype(np.float64), (ends - starts).astype(np.int64), [labels[s:e] for s, e in zip(starts, ends, strict=True)]


def _utf8_bytes(sp: spm.SentencePieceProcessor, docs: list[np.ndarray], skip: set[int]) -> np.ndarray:
    ids = [[int(t) for t in d if int(t) not in skip] for d in docs]
    texts = sp.decode(ids) if ids else []
    return np.array([len(t.encode("utf-8")) for t in texts], dtype=np.int64)


def heldout_metrics(
    model: torch.nn.Module,
    manifest_path: str | Path,
    *,
    batch_size: int = 16,
    seq_len: int = 256,
    max_tokens: int | None = None,
    domains: list[str] | None = None,
    tokenizer: spm.SentencePieceProcessor | None = None,
) -> HeldoutResult:
    """Score the validation split (every token once per domain, up to max_tokens per domain)."""
    mpath = manifest_file(manifest_path)
    manifest = load_manifest(mpath)
    sp = tokenizer if tokenizer is not None else dataset_tokenizer(mpath)
    tok = manifest.tokenizer
    skip = {i for i in (tok.pad_id, tok.bos_id, tok.eos_id) if i >= 0}
    names = domains if domains is not None else sorted(d for d in manifest.domain_names
                                                        if manifest.shards_for("val", d))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out: dict[str, DomainHeldout] = {}
    t0 = time.perf_counter()
    try:
        for name in names:
            labels_parts, nll_parts, scored = [], [], 0
            for _, batch in validation_batches(mpath, batch_size, seq_len, [name]):
                nll = token_nll(model, batch.input_ids.to(device), batch.labels.to(device)).cpu().numpy()
                mask = batch.loss_mask.numpy() > 0
                labels_parts.append(batch.labels.numpy()[mask])  # row-major: windows stay in stream order
                nll_parts.append(nll[mask].astype(np.float64))
                scored += int(mask.sum())
                if max_tokens is not None and scored >= max_tokens:
                    break
            labels = np.concatenate(labels_parts) if labels_parts else np.zeros(0, dtype=np.int64)
            nll = np.concatenate(nll_parts) if nll_parts else np.zeros(0)
            if max_tokens is not None:
                labels, nll = labels[:max_tokens], nll[:max_tokens]
            if labels.size == 0:
                continue
            doc_nll, doc_tokens, docs = _documents(labels, nll, tok.eos_id)
            doc_bytes = _utf8_bytes(sp, docs, skip)
            out[name] = DomainHeldout(name, int(labels.size), float(nll.sum()), int(doc_bytes.sum()),
                                      doc_nll, doc_tokens, doc_bytes)
    finally:
        model.train(was_training)
    if not out:
        raise ValueError(f"dataset {manifest.version} has no validation tokens for domains {names}")
    settings = {"dataset_version": manifest.version, "seq_len": seq_len, "max_tokens": max_tokens,
                "domains": list(out)}
    return HeldoutResult(out, time.perf_counter() - t0, settings)


def sample_sequences(manifest_path: str | Path, n: int, seq_len: int) -> torch.Tensor:
    """n validation windows of seq_len tokens [n, seq_len] (fully real tokens), for parity checks.
    In a RAG-packed dataset retrieved context is real text though its loss weight is 0: there a
    window counts when none of it is padding (token_kind), not when every label has weight 1."""
    rows: list[torch.Tensor] = []
    for _, batch in validation_batches(manifest_file(manifest_path), n, seq_len):
        real = batch.token_kind != 0 if batch.token_kind is not None else batch.loss_mask > 0
        full = real.all(-1)
        rows.extend(batch.input_ids[full])
        if len(rows) >= n:
            break
    if len(rows) < 2:
        raise ValueError(f"the validation split has fewer than 2 windows of {seq_len} tokens for parity checks")
    return torch.stack(rows[:n])
