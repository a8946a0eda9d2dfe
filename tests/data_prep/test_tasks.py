"""The ingest pool task: what it precomputes for the filter, exact and near dedup is what those
stages compute themselves."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from services.data_prep.dedup import minhash_signatures
from services.data_prep.filters import reject_reason
from services.data_prep.ingest import discover_files, read_files
from services.data_prep.tasks import ingest_task
from shared.data.config import FilterConfig, MinHashConfig
from tests.data_prep.conftest import make_config


def test_ingest_task_matches_the_stages(corpus_dir: Path) -> None:
    cfg = make_config()
    (corpus_dir / "corpus" / "code" / "tiny.py").write_text("x = 1\n")  # the filter rejects it (too short)
    files = discover_files(cfg.corpus, corpus_dir)
    filters, mh = FilterConfig(), MinHashConfig()
    results, reasons, sigs = ingest_task((files, filters, (mh.ngram, mh.num_perm, mh.seed)))
    expected = read_files(files)
    docs = [d for r in results for d in r.docs]
    assert [d.text for d in docs] == [d.text for r in expected for d in r.docs]
    assert [r.sha256 for r in results] == [r.sha256 for r in expected]
    assert reasons == [reject_reason(d.text, filters) for d in docs]
    assert "too_short" in reasons
    kept = [d for d, reason in zip(docs, reasons, strict=True) if reason is None]
    assert sigs is not None and np.array_equal(sigs, minhash_signatures([d.text for d in kept], mh.ngram,
                                                                        mh.num_perm, mh.seed))
    assert all(d.digest == hashlib.sha256(d.text.encode()).digest() for d in kept)
    assert all(d.digest == b"" for d, reason in zip(docs, reasons, strict=True) if reason is not None)
    _, _, none = ingest_task((files, filters, None))
    assert none is None
