"""RAG packing: base windows of a token stream, and the fixed records they are packed into.

A record holds W = rag.seq_len + 1 tokens::

    [pad ...] [<ctx> chunk </ctx>] ... [<doc>] [base text]

The base text is a window of B = W - 1 - C tokens of the split/domain stream (documents
separated by EOS, as in the flat shards), C = floor(context_budget * W) the retrieved part's
budget (boundary tokens included). Chunks go in rank order; the last one that does not fit is
cut to the space left (when at least MIN_CHUNK_TOKENS remain), then packing stops. Padding
fills what retrieval left empty, at the front, so that every record ends with its base text
(the crop of shorter windows, shared.data.dataset.crop_window, relies on that).

Each token's kind goes to the mask file beside the shard (uint8): pad, context (chunks,
boundaries and the marker: weight rag.context_loss_weight), base (weight 1).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shared.data.manifest import MASK_BASE, MASK_CONTEXT, MASK_PAD, MaskFileInfo, ShardInfo

MIN_CHUNK_TOKENS = 8
"""A chunk cut shorter than this is left out: a few tokens of context teach nothing."""


@dataclass(frozen=True)
class Layout:
    record_tokens: int  # W
    context_tokens: int  # C, the retrieved part's budget
    ctx_open: int
    ctx_close: int
    doc: int
    pad: int

    @property
    def base_tokens(self) -> int:
        return self.record_tokens - 1 - self.context_tokens

    @classmethod
    def of(cls, seq_len: int, context_budget: float, ids: dict[str, int], pad: int) -> Layout:
        w = seq_len + 1
        c = int(context_budget * w)
        if w - 1 - c < 1:
            raise ValueError(f"rag.context_budget {context_budget} leaves no base text in a window of {w} tokens")
        return cls(w, c, ids["<ctx>"], ids["</ctx>"], ids["<doc>"], pad)


def base_windows(doc_ends: np.ndarray, total: int, base_tokens: int) -> list[tuple[int, int, int, int]]:
    """(start, end, first document, last document) of consecutive base windows of a stream.

    doc_ends: the end offset of every document (just past its EOS), ascending, last = total."""
    out = []
    for start in range(0, total, base_tokens):
        end = min(start + base_tokens, total)
        first = int(np.searchsorted(doc_ends, start, side="right"))
        last = int(np.searchsorted(doc_ends, end - 1, side="right"))
        out.append((start, end, first, last))
    return out


def pack_record(layout: Layout, base: np.ndarray, chunks: list[list[int]]) -> tuple[np.ndarray, np.ndarray, int]:
    """One record's tokens and kinds, and how many chunks went in (whole or cut)."""
    w = layout.record_tokens
    ctx: list[int] = []
    used = 0
    for ids in chunks:
        room = layout.context_tokens - len(ctx) - 2
        if room < MIN_CHUNK_TOKENS and room < len(ids):
            break
        ctx += [layout.ctx_open, *ids[:room], layout.ctx_close]
        used += 1
        if len(ids) > room:
            break
    n_pad = w - len(ctx) - 1 - len(base)
    tokens = np.empty(w, dtype=np.int64)
    kinds = np.empty(w, dtype=np.uint8)
    tokens[:n_pad], kinds[:n_pad] = layout.pad, MASK_PAD
    tokens[n_pad : n_pad + len(ctx)], kinds[n_pad : n_pad + len(ctx)] = ctx, MASK_CONTEXT
    tokens[w - len(base) - 1], kinds[w - len(base) - 1] = layout.doc, MASK_CONTEXT
    tokens[w - len(base) :], kinds[w - len(base) :] = base, MASK_BASE
    return tokens, kinds, used


class PackedShardWriter:
    """Appends records to the shards (and mask files) of one (split, domain), hashing as it writes."""

    def __init__(self, root: Path, split: str, domain: str, dtype: str, shard_tokens: int) -> None:
        self.root, self.split, self.domain, self.dtype, self.shard_tokens = root, split, domain, dtype, shard_tokens
        self.shards: list[ShardInfo] = []
        self._open = False
        self.kind_counts = np.zeros(3, dtype=np.int64)

    def _start(self) -> None:
        self._rel = f"{self.split}/{self.domain}/shard_{len(self.shards):05d}.bin"
        self._mask_rel = self._rel.removesuffix(".bin") + ".mask.bin"
        (self.root / self._rel).parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.root / self._rel, "wb")  # noqa: SIM115 - closed in _close
        self._mask = open(self.root / self._mask_rel, "wb")  # noqa: SIM115 - closed in _close
        self._sha, self._mask_sha = hashlib.sha256(), hashlib.sha256()
        self._tokens = self._records = 0
        self._open = True

    def add(self, tokens: np.ndarray, kinds: np.ndarray) -> None:
        if not self._open:
            self._start()
        data, mask = tokens.astype(self.dtype).tobytes(), kinds.astype(np.uint8).tobytes()
        self._file.write(data)
        self._mask.write(mask)
        self._sha.update(data)
        self._mask_sha.update(mask)
        self._tokens += tokens.size
        self._records += 1
        self.kind_counts += np.bincount(kinds, minlength=3)[:3]
        if self._tokens >= self.shard_tokens:
            self._close()

    def _close(self) -> None:
        for f in (self._file, self._mask):
            f.flush()
            os.fsync(f.fileno())
            f.close()
        itemsize = np.dtype(self.dtype).itemsize
        self.shards.append(ShardInfo(
            path=self._rel, split=self.split, domain=self.domain, sha256=self._sha.hexdigest(),  # type: ignore[arg-type]
            size_bytes=self._tokens * itemsize, documents=self._records, tokens=self._tokens, dtype=self.dtype,  # type: ignore[arg-type]
            mask=MaskFileInfo(path=self._mask_rel, sha256=self._mask_sha.hexdigest(), size_bytes=self._tokens),
        ))
        self._open = False

    def finish(self) -> list[ShardInfo]:
        if self._open:
            self._close()
        return self.shards


KIND_NAMES = {MASK_PAD: "pad", MASK_CONTEXT: "context", MASK_BASE: "base"}
