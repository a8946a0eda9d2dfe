"""The ingest stage's pool task: read a chunk of files and do, per document, what the next stages
would otherwise do in the main process, one document after the other: the quality filter's
verdict, the SHA-256 exact dedup compares and near dedup's MinHash signature. Each depends on the
document's text alone, so the results are the same whichever process made them (the main process
only applies them)."""

from __future__ import annotations

import hashlib

import numpy as np

from services.data_prep.dedup import minhash_signatures
from services.data_prep.filters import reject_reason
from services.data_prep.ingest import FileResult, SourceFile, read_files
from shared.data.config import FilterConfig


def ingest_task(
    args: tuple[list[SourceFile], FilterConfig, tuple[int, int, int] | None],
) -> tuple[list[FileResult], list[str | None], np.ndarray | None]:
    """(the files' results, each document's filter reject reason (None: kept), and, when minhash
    (ngram, num_perm, seed) is given, the signatures of the documents the filter keeps, in order)."""
    files, filters, minhash = args
    results = read_files(files)
    docs = [d for r in results for d in r.docs]
    reasons = [reject_reason(d.text, filters) for d in docs]
    for d, reason in zip(docs, reasons, strict=True):
        if reason is None:
            d.digest = hashlib.sha256(d.text.encode("utf-8")).digest()  # what exact dedup goes by
    if minhash is None:
        return results, reasons, None
    ngram, num_perm, seed = minhash
    kept = [d.text for d, reason in zip(docs, reasons, strict=True) if reason is None]
    return results, reasons, minhash_signatures(kept, ngram, num_perm, seed)
