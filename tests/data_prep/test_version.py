"""Dataset version ids: stable for the same inputs and parameters, sensitive to every one of them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from services.data_prep.pipeline import PIPELINE_VERSION, dataset_version, plan_version
from shared.artifacts import ArtifactStore
from shared.data.config import DataPrepConfig

from .conftest import make_config

# One changed value per parameter. test_every_parameter_is_covered fails when a config field
# is added without being listed here or in NOT_VERSIONED.
CHANGES: dict[str, Any] = {
    "corpus.sources.0.domain": "poetry",
    "corpus.sources.0.kind": "jsonl",
    "corpus.sources.0.text_field": "body",
    "corpus.sources.0.domain_field": "kind",
    "corpus.sources.0.docstrings": True,
    "corpus.sources.0.exclude": ["*.md"],
    "filters.min_doc_chars": 33,
    "filters.max_doc_chars": 999_999,
    "filters.max_line_chars": 999,
    "filters.max_non_text_fraction": 0.25,
    "minhash.enabled": False,
    "minhash.ngram": 4,
    "minhash.num_perm": 64,
    "minhash.threshold": 0.7,
    "minhash.seed": 2,
    "semantic.enabled": True,
    "semantic.model": "/models/other",
    "semantic.threshold": 0.9,
    "semantic.n_clusters": 8,
    "semantic.kmeans_iters": 10,
    "semantic.max_chars": 500,
    "semantic.batch_size": 32,
    "semantic.seed": 1,
    "tokenizer.vocab_size": 401,
    "tokenizer.model_type": "unigram",
    "tokenizer.byte_fallback": False,
    "tokenizer.split_digits": False,
    "tokenizer.character_coverage": 0.99,
    "tokenizer.input_sentence_size": 1000,
    "tokenizer.max_sentence_length": 2048,
    "tokenizer.seed": 1,
    "tokenizer.from_dataset": "ds-parent",
    "sharding.shard_tokens": 4_001,
    "sharding.val_fraction": 0.2,
    "sharding.seed": 1,
    "rag": {"retriever": "local"},  # RAG packing on; its own fields: tests/rag/test_packing.py
}
NOT_VERSIONED: dict[str, Any] = {
    "corpus.roots": ["corpus", "."],
    "corpus.sources.0.path": "./corpus/prose",
    "sharding.workers": 2,
    "tokenizer.model_path": "some/file.model",  # its content's SHA-256 is versioned instead
}


def set_path(config: DataPrepConfig, dotted: str, value: Any) -> DataPrepConfig:
    data = config.model_dump()
    node: Any = data
    keys = [int(k) if k.isdigit() else k for k in dotted.split(".")]
    for k in keys[:-1]:
        node = node[k]
    node[keys[-1]] = value
    return DataPrepConfig.model_validate(data)


def leaf_fields(model: type[BaseModel], prefix: str = "") -> set[str]:
    out = set()
    for name, field in model.model_fields.items():
        ann = field.annotation
        inner = getattr(ann, "__args__", (None,))[0] if getattr(ann, "__origin__", None) is list else None
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out |= leaf_fields(ann, f"{prefix}{name}.")
        elif isinstance(inner, type) and issubclass(inner, BaseModel):
            out |= leaf_fields(inner, f"{prefix}{name}.0.")
        else:
            out.add(prefix + name)
    return out


def test_every_parameter_is_covered() -> None:
    assert leaf_fields(DataPrepConfig) == set(CHANGES) | set(NOT_VERSIONED)


def test_same_inputs_and_parameters_give_the_same_version(corpus_dir: Path, store: ArtifactStore) -> None:
    cfg = make_config()
    v1 = plan_version(cfg, store, corpus_dir)
    v2 = plan_version(DataPrepConfig.model_validate_json(cfg.model_dump_json()), store, corpus_dir)
    assert v1 == v2 and v1.startswith("ds-")


@pytest.mark.parametrize("dotted", sorted(CHANGES))
def test_version_changes_with_every_parameter(dotted: str) -> None:
    base = make_config()
    changed = set_path(base, dotted, CHANGES[dotted])
    assert dataset_version(changed, "inputs") != dataset_version(base, "inputs"), dotted


@pytest.mark.parametrize("dotted", sorted(NOT_VERSIONED))
def test_version_ignores_where_and_how_many_workers(dotted: str) -> None:
    base = make_config()
    changed = set_path(base, dotted, NOT_VERSIONED[dotted])
    assert dataset_version(changed, "inputs") == dataset_version(base, "inputs")


def test_version_changes_with_pipeline_version(
    corpus_dir: Path, store: ArtifactStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    v1 = plan_version(make_config(), store, corpus_dir)
    monkeypatch.setattr("services.data_prep.pipeline.PIPELINE_VERSION", PIPELINE_VERSION + "-next")
    assert plan_version(make_config(), store, corpus_dir) != v1


def test_version_changes_with_input_content(corpus_dir: Path, store: ArtifactStore) -> None:
    cfg = make_config()
    v0 = plan_version(cfg, store, corpus_dir)
    target = corpus_dir / "corpus" / "prose" / "p0000.txt"
    original = target.read_bytes()
    target.write_bytes(original + b"x")
    v1 = plan_version(cfg, store, corpus_dir)
    target.write_bytes(original)
    (corpus_dir / "corpus" / "prose" / "p9999.txt").write_text("a new file")
    v2 = plan_version(cfg, store, corpus_dir)
    (corpus_dir / "corpus" / "prose" / "p9999.txt").unlink()
    target.rename(target.with_name("renamed.txt"))
    v3 = plan_version(cfg, store, corpus_dir)
    target.with_name("renamed.txt").rename(target)
    assert len({v0, v1, v2, v3}) == 4
    assert plan_version(cfg, store, corpus_dir) == v0


def test_version_changes_with_a_reused_tokenizer_file(corpus_dir: Path, store: ArtifactStore) -> None:
    model = corpus_dir / "corpus" / "tok.model"
    model.write_bytes(b"first")
    cfg = set_path(make_config(), "tokenizer.model_path", "corpus/tok.model")
    v1 = plan_version(cfg, store, corpus_dir)
    model.write_bytes(b"second")
    assert plan_version(cfg, store, corpus_dir) != v1


def test_moved_corpus_keeps_its_version(tmp_path: Path, store: ArtifactStore) -> None:
    from .conftest import write_corpus

    write_corpus(tmp_path / "a")
    write_corpus(tmp_path / "b")
    assert plan_version(make_config(), store, tmp_path / "a") == plan_version(make_config(), store, tmp_path / "b")


def test_bad_config_names_the_field() -> None:
    data = make_config().model_dump()
    data["minhash"]["num_perms"] = 64
    with pytest.raises(ValidationError, match=r"minhash\.num_perms"):
        DataPrepConfig.model_validate(data)
    data = make_config().model_dump()
    data["sharding"]["val_fraction"] = 1.5
    with pytest.raises(ValidationError, match=r"sharding\.val_fraction"):
        DataPrepConfig.model_validate(data)


def test_default_corpus_is_the_stdlib_demo() -> None:
    cfg = DataPrepConfig()
    assert [s.domain for s in cfg.corpus.sources] == ["code", "docs"]
    assert cfg.corpus.sources[1].docstrings and cfg.corpus.roots == ["{stdlib}"]
