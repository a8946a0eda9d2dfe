"""Fixtures of the data-prep tests: tiny corpora written to tmp dirs, Shakespeare prose, a store.

The prose comes from tests/data/tinyshakespeare_excerpt.txt (see tests/data/README.md): the
suite needs nothing outside the repository.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from shared.artifacts import ArtifactStore
from shared.data.config import (
    CorpusConfig,
    CorpusSource,
    DataPrepConfig,
    FilterConfig,
    ShardingConfig,
    TokenizerConfig,
)

REPO = Path(__file__).resolve().parents[2]
SHAKESPEARE = REPO / "tests" / "data" / "tinyshakespeare_excerpt.txt"


def shakespeare_paragraphs(n: int | None = None) -> list[str]:
    """The first n paragraphs (speaker blocks) of tinyshakespeare longer than 200 characters (400 at most)."""
    paras = [p for p in SHAKESPEARE.read_text("utf-8").rstrip("\n").split("\n\n") if len(p) > 200]
    if n is not None and n > len(paras):
        raise ValueError(f"{SHAKESPEARE.name} holds {len(paras)} paragraphs over 200 characters, {n} were asked for")
    return paras[:n] if n is not None else paras


def code_doc(i: int) -> str:
    """A small, distinct Python module."""
    rng = random.Random(i)
    names = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "theta"]
    funcs = []
    for j in range(rng.randint(3, 6)):
        a, b = rng.sample(names, 2)
        funcs.append(
            f"def {a}_{b}_{i}_{j}(x, y={rng.randint(0, 99)}):\n"
            f'    """Combine {a} and {b} ({i}/{j})."""\n'
            f"    if x > {rng.randint(0, 999)}:\n"
            f"        return x * {rng.randint(2, 9)} + y\n"
            f"    return [v for v in range(x) if v % {rng.randint(2, 7)}]\n"
        )
    return f'"""Module {i}: helpers for {rng.choice(names)}."""\n\nimport math\n\n\n' + "\n\n".join(funcs)


def write_corpus(root: Path, n_prose: int = 60, n_code: int = 40) -> Path:
    """A two-domain corpus under root/corpus: prose/*.txt and code/*.py."""
    corpus = root / "corpus"
    (corpus / "prose").mkdir(parents=True, exist_ok=True)
    (corpus / "code").mkdir(parents=True, exist_ok=True)
    for i, para in enumerate(shakespeare_paragraphs(n_prose)):
        (corpus / "prose" / f"p{i:04d}.txt").write_text(para + "\n", "utf-8")
    for i in range(n_code):
        (corpus / "code" / f"m{i:04d}.py").write_text(code_doc(i), "utf-8")
    return corpus


def make_config(**overrides: object) -> DataPrepConfig:
    """A small, fast config over write_corpus's layout (paths relative to the test's base dir)."""
    cfg = DataPrepConfig(
        corpus=CorpusConfig(
            sources=[
                CorpusSource(path="corpus/prose", domain="prose"),
                CorpusSource(path="corpus/code", domain="code"),
            ],
            roots=["corpus"],
        ),
        filters=FilterConfig(min_doc_chars=32),
        tokenizer=TokenizerConfig(vocab_size=400),
        sharding=ShardingConfig(shard_tokens=4_000, val_fraction=0.1, workers=1),
    )
    return cfg.model_copy(update=overrides) if overrides else cfg


@pytest.fixture
def corpus_dir(tmp_path: Path) -> Path:
    write_corpus(tmp_path)
    return tmp_path


@pytest.fixture
def store(tmp_path: Path) -> ArtifactStore:
    return ArtifactStore(tmp_path / "store")
