"""Retrieval gain: how much retrieved context lowers the loss of the base text, beyond what any
extra tokens would.

For a run trained on a RAG-packed dataset (its manifest has `rag`), on validation windows:

* without: the window's base text after the `<doc>` marker, no chunk (the layout training gives a
  window for which nothing was retrieved: padding, `<doc>`, base text);
* with: the chunks the dataset's own local index (``rag_index/``, loaded verified by its digest in
  the manifest; built from the TRAIN split only) retrieves for the window's query (the first
  ``rag.query_chars`` characters of its base text, as data prep asks), packed in front with the
  training layout (shared.retrieval.packing.pack_record: the same budget, markers and cut);
* random (the control): chunks of the training index drawn at random, cut or joined to exactly the
  token lengths the retrieved chunks took, packed the same way, so both contexts are equally long.

The leakage rule holds in all three: no chunk of the window's own documents (or their duplicates,
as listed in the dataset's retrieval report) is ever used. Only the base tokens are scored (the
kinds of the packed record), at the same positions in the three records, so the figures compare
like with like: loss (nats/token) and bits per byte (UTF-8 bytes of the decoded base text), and
gain = without - with, control_gain = without - random (a gain from context length alone shows up
in the control, and only a gain above it is retrieval's).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import sentencepiece as spm
import torch
import torch.nn.functional as F

from contracts import RetrievalQuery
from shared.data.config import RagConfig
from shared.data.manifest import MASK_BASE, MASK_PAD, Manifest, load_manifest
from shared.retrieval import LocalIndex
from shared.retrieval.packing import Layout, pack_record

LN2 = math.log(2.0)


class RetrievalGainError(ValueError):
    """The dataset's RAG artifacts cannot be used (index digest, missing files)."""


@dataclass(frozen=True)
class Window:
    """One validation window: its base tokens and what may not be retrieved for it."""

    window_id: str
    base: np.ndarray
    exclude: frozenset[str]


def summarize(nll_without: np.ndarray, nll_with: np.ndarray, nll_random: np.ndarray, n_bytes: int,
              **counts: float) -> dict[str, float]:
    """The report's figures from per-base-token NLLs (nats) of the three conditions, same tokens."""
    n = int(nll_without.size)
    if n == 0 or nll_with.size != n or nll_random.size != n:
        raise ValueError(f"need the same non-zero number of base tokens in each condition, got "
                         f"{nll_without.size}, {nll_with.size}, {nll_random.size}")
    sums = {k: float(np.sum(v, dtype=np.float64)) for k, v in
            (("without", nll_without), ("with", nll_with), ("random", nll_random))}
    out = {f"loss_{k}": s / n for k, s in sums.items()}
    out |= {f"bpb_{k}": s / LN2 / n_bytes for k, s in sums.items()}
    out["gain"] = out["loss_without"] - out["loss_with"]
    out["control_gain"] = out["loss_without"] - out["loss_random"]
    out["gain_bpb"] = out["bpb_without"] - out["bpb_with"]
    out["control_gain_bpb"] = out["bpb_without"] - out["bpb_random"]
    out["base_tokens"] = float(n)
    out["base_bytes"] = float(n_bytes)
    return out | {k: float(v) for k, v in counts.items()}


def load_index(dataset_dir: Path, manifest: Manifest) -> LocalIndex:
    """The dataset's saved local index, refused when its digest is not the manifest's."""
    assert manifest.rag is not None
    try:
        return LocalIndex.load(dataset_dir / manifest.rag.index.path, expected_digest=manifest.rag.index.sha256)
    except ValueError as exc:
        raise RetrievalGainError(str(exc)) from exc


def validation_windows(dataset_dir: Path, manifest: Manifest, max_windows: int | None) -> list[Window]:
    """Base tokens of the packed validation records (stream order) and their excluded sources."""
    assert manifest.rag is not None
    rag = manifest.rag
    excluded: dict[str, frozenset[str]] = {}
    report = dataset_dir / rag.report.path
    if report.is_file():
        for line in report.read_text("utf-8").splitlines():
            rec = json.loads(line)
            excluded[rec["window"]] = frozenset(rec.get("sources", []))
    out: list[Window] = []
    for domain in manifest.domain_names:
        n = 0
        for shard in manifest.shards_for("val", domain):
            if shard.mask is None:
                raise RetrievalGainError(f"validation shard {shard.path} of a RAG dataset has no mask file")
            tokens = np.fromfile(dataset_dir / shard.path, dtype=shard.dtype).astype(np.int64)
            kinds = np.fromfile(dataset_dir / shard.mask.path, dtype=np.uint8)
            for rec, kind in zip(tokens.reshape(-1, rag.record_tokens), kinds.reshape(-1, rag.record_tokens),
                                 strict=True):
                wid = f"val/{domain}/{n}"
                out.append(Window(wid, rec[kind == MASK_BASE], excluded.get(wid, frozenset())))
                n += 1
    if max_windows is not None and len(out) > max_windows:  # evenly spread over the split
        picks = np.linspace(0, len(out) - 1, max_windows).round().astype(int)
        out = [out[i] for i in dict.fromkeys(picks.tolist())]
    return out


def _segments(tokens: np.ndarray, layout: Layout) -> list[list[int]]:
    """The chunk token runs of a packed record, between <ctx> and </ctx>."""
    segs: list[list[int]] = []
    cur: list[int] | None = None
    for t in tokens.tolist():
        if t == layout.ctx_open:
            cur = []
        elif t == layout.ctx_close and cur is not None:
            segs.append(cur)
            cur = None
        elif cur is not None:
            cur.append(t)
    return segs


def _random_like(lengths: list[int], pool: list[list[int]], allowed: np.ndarray, rng: np.random.Generator
                 ) -> list[list[int]]:
    """Random chunks (of the allowed pool) cut, or joined, to exactly these token lengths."""
    out = []
    for n in lengths:
        ids: list[int] = []
        while len(ids) < n:
            ids += pool[int(allowed[rng.integers(len(allowed))])]
        out.append(ids[:n])
    return out


@torch.inference_mode()
def _base_nll(model: torch.nn.Module, records: list[np.ndarray], kinds: list[np.ndarray], batch_size: int,
              max_len: int) -> np.ndarray:
    """NLL (nats) of every base token of each record, records in order, tokens in order."""
    device = next(model.parameters()).device
    out: list[np.ndarray] = []
    for i in range(0, len(records), batch_size):
        toks = np.stack([r[-(max_len + 1):] for r in records[i : i + batch_size]])
        kind = np.stack([k[-(max_len + 1):] for k in kinds[i : i + batch_size]])
        x = torch.from_numpy(toks[:, :-1]).to(device)
        y = torch.from_numpy(toks[:, 1:]).to(device)
        nll = F.cross_entropy(model(x).float().transpose(1, 2), y, reduction="none").cpu().numpy()
        out.append(nll[kind[:, 1:] == MASK_BASE].astype(np.float64))  # row-major: records stay in order
    return np.concatenate(out) if out else np.zeros(0)


def retrieval_gain(
    model: torch.nn.Module,
    manifest_path: str | Path,
    sp: spm.SentencePieceProcessor,
    *,
    max_windows: int | None = 64,
    batch_size: int = 16,
    seed: int = 0,
) -> tuple[dict[str, float] | None, str]:
    """(figures, note) for a RAG-packed dataset; (None, why) for a dataset without `rag`."""
    mpath = Path(manifest_path)
    mpath = mpath / "manifest.json" if mpath.is_dir() else mpath
    manifest = load_manifest(mpath)
    if manifest.rag is None:
        return None, (f"skipped: dataset {manifest.version} was not packed with retrieved context "
                      "(the run has no rag: section)")
    t0 = time.perf_counter()
    root, rag = mpath.parent, manifest.rag
    settings = RagConfig.model_validate(manifest.config["rag"]) if manifest.config.get("rag") else RagConfig()
    layout = Layout.of(rag.seq_len, rag.context_budget, rag.boundary_ids, max(manifest.tokenizer.pad_id, 0))
    index = load_index(root, manifest)
    windows = validation_windows(root, manifest, max_windows)
    if not windows:
        raise RetrievalGainError(f"dataset {manifest.version} has no validation windows")
    skip = {i for i in (manifest.tokenizer.pad_id, manifest.tokenizer.bos_id, manifest.tokenizer.eos_id) if i >= 0}
    texts = sp.decode([[t for t in w.base.tolist() if t not in skip] for w in windows])
    queries = [RetrievalQuery(query_id=w.window_id, text=text[: settings.query_chars] or " ", k=settings.k,
                              exclude_source_ids=sorted(w.exclude)) for w, text in zip(windows, texts, strict=True)]
    hits = index.search(queries)
    pool_ids = sp.encode([c.text for c in index.chunks], num_threads=1)
    sources = np.array([c.source_id for c in index.chunks], dtype=object)
    rng = np.random.default_rng(seed)

    recs: dict[str, list[np.ndarray]] = {"without": [], "with": [], "random": []}
    kinds: dict[str, list[np.ndarray]] = {"without": [], "with": [], "random": []}
    context_tokens = retrieved_windows = chunks = 0
    chunk_pos = {c.chunk_id: i for i, c in enumerate(index.chunks)}
    for w, found in zip(windows, hits, strict=True):
        ids = [pool_ids[chunk_pos[c.chunk_id]] for c, _ in found]
        with_tokens, with_kinds, used = pack_record(layout, w.base, ids)
        lengths = [len(s) for s in _segments(with_tokens[: len(with_tokens) - len(w.base) - 1], layout)]
        allowed = np.flatnonzero(~np.isin(sources, list(w.exclude))) if w.exclude else np.arange(len(sources))
        random_tokens, random_kinds, _ = pack_record(layout, w.base, _random_like(lengths, pool_ids, allowed, rng))
        bare_tokens, bare_kinds, _ = pack_record(layout, w.base, [])
        for name, t, k in (("without", bare_tokens, bare_kinds), ("with", with_tokens, with_kinds),
                           ("random", random_tokens, random_kinds)):
            recs[name].append(t)
            kinds[name].append(k)
        context_tokens += sum(lengths)
        retrieved_windows += used > 0
        chunks += used
    max_len = int(getattr(getattr(model, "config", None), "max_seq_len", layout.record_tokens - 1))
    was_training = model.training
    model.eval()
    try:
        nll = {name: _base_nll(model, recs[name], kinds[name], batch_size, max_len) for name in recs}
    finally:
        model.train(was_training)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    figures = summarize(nll["without"], nll["with"], nll["random"], n_bytes, windows=len(windows),
                        retrieved_windows=retrieved_windows, chunks=chunks,
                        context_tokens_per_window=context_tokens / len(windows),
                        seconds=time.perf_counter() - t0)
    return figures, (f"{len(windows)} validation windows, local index {rag.index.sha256[:12]} "
                     f"({rag.index.chunks} train chunks), k={settings.k}")


def format_retrieval(figures: dict[str, Any]) -> str:
    """One line for the CLI summary."""
    return (f"retrieval gain {figures['gain']:+.4f} nats/token ({figures['gain_bpb']:+.4f} bits/byte) vs random-"
            f"context control {figures['control_gain']:+.4f} ({figures['control_gain_bpb']:+.4f}); loss without "
            f"{figures['loss_without']:.4f}, with {figures['loss_with']:.4f}, random {figures['loss_random']:.4f} "
            f"over {int(figures['windows'])} windows")


# --- retrieval-conditioned suite prompts ---------------------------------------------------------


@dataclass(frozen=True)
class RagPrompt:
    """A suite prompt laid out as training packed it, with and without retrieved context."""

    with_ids: list[int]
    without_ids: list[int]
    chunk_ids: list[str]  # the chunks that went in (whole or cut), rank order
    context_tokens: int  # tokens of the retrieved part (chunks and their boundaries)


class RagPrompter:
    """Builds retrieval-conditioned prompts for a RAG-trained run, as training packed its windows.

    The retriever is the dataset's own local index (``rag_index/``, loaded verified by the digest in
    the manifest); a prompt's query (the item's `query`, else its prompt) is cut to
    ``rag.query_chars`` characters as data prep cuts a window's, its top ``rag.k`` chunks (each chunk's
    text encoded alone, as data prep encodes them) go through `packing.pack_record` with the
    dataset's layout (seq_len, context budget, boundary ids, the MIN_CHUNK_TOKENS cut). The base text
    is EOS + the prompt's ids (a prompt is the start of a document, as for every suite item). The
    record's front padding is dropped, as `helox generate --rag` drops it:

        with:    <ctx> c1 </ctx> <ctx> c2 </ctx> ... <doc> EOS prompt
        without: <doc> EOS prompt   (the layout training gives a window with nothing retrieved)
    """

    def __init__(self, sp: spm.SentencePieceProcessor, layout: Layout, index: LocalIndex, k: int, query_chars: int,
                 eos_id: int, note: str) -> None:
        self.sp, self.layout, self.index, self.k, self.query_chars = sp, layout, index, k, query_chars
        self.eos_id, self.note = eos_id, note

    @classmethod
    def of(cls, manifest_path: str | Path, sp: spm.SentencePieceProcessor) -> tuple[RagPrompter | None, str]:
        """(prompter, note) for a RAG-packed dataset; (None, why) for one without `rag`.
        Raises RetrievalGainError when the index is missing or its digest is not the manifest's."""
        mpath = Path(manifest_path)
        mpath = mpath / "manifest.json" if mpath.is_dir() else mpath
        manifest = load_manifest(mpath)
        if manifest.rag is None:
            return None, (f"dataset {manifest.version} was not packed with retrieved context (the run has no "
                          "rag: section): retrieval-conditioned items need a RAG-trained run")
        rag = manifest.rag
        settings = RagConfig.model_validate(manifest.config["rag"]) if manifest.config.get("rag") else RagConfig()
        layout = Layout.of(rag.seq_len, rag.context_budget, rag.boundary_ids, max(manifest.tokenizer.pad_id, 0))
        index = load_index(mpath.parent, manifest)
        note = (f"local index {rag.index.sha256[:12]} of dataset {manifest.version} ({rag.index.chunks} train "
                f"chunks), k={settings.k}, context budget {rag.context_budget} of {layout.record_tokens} tokens")
        if rag.retriever != LocalIndex.NAME:
            note += f"; training retrieved with {rag.retriever}, suites with the dataset's local index"
        return cls(sp, layout, index, settings.k, settings.query_chars, manifest.tokenizer.eos_id, note), note

    def retrieve(self, queries: list[str]) -> list[list[tuple[str, list[int]]]]:
        """(chunk id, token ids) of the top-k chunks of each query, best first."""
        hits = self.index.search([RetrievalQuery(query_id=str(i), text=q[: self.query_chars] or " ", k=self.k)
                                  for i, q in enumerate(queries)])
        texts = list(dict.fromkeys(c.text for found in hits for c, _ in found))
        ids = dict(zip(texts, self.sp.encode(texts, num_threads=1), strict=True)) if texts else {}
        return [[(c.chunk_id, ids[c.text]) for c, _ in found] for found in hits]

    def pack_base(self, base: np.ndarray, chunks: list[list[int]]) -> tuple[list[int], int]:
        """(ids, chunks used): `pack_record` of the dataset's layout, its front padding dropped."""
        tokens, kinds, used = pack_record(self.layout, base, chunks)
        return tokens[kinds != MASK_PAD].tolist(), used

    def pack(self, prompt_ids: list[int], chunks: list[tuple[str, list[int]]]) -> RagPrompt:
        """The with/without prompts of one item (base = EOS + prompt_ids). ValueError when the base
        text does not fit the layout's base part."""
        base = np.array([self.eos_id, *prompt_ids], dtype=np.int64)
        if len(base) > self.layout.base_tokens:
            raise ValueError(f"the prompt takes {len(base)} tokens (EOS included), more than the "
                             f"{self.layout.base_tokens} the RAG layout leaves for base text")
        with_ids, used = self.pack_base(base, [ids for _, ids in chunks])
        without_ids, _ = self.pack_base(base, [])
        return RagPrompt(with_ids, without_ids, [c for c, _ in chunks[:used]], len(with_ids) - len(base) - 1)
