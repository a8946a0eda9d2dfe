"""ExportConfig validation and the export policy (on / checkpoint)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from contracts import ArtifactRef, EvaluationCompleted, TrainingCompleted
from services.exporter.config import ExportConfig
from services.exporter.export import checkpoint_to_export


def ref(c: str) -> ArtifactRef:
    return ArtifactRef(uri=f"file:///a/{c}/manifest.json", sha256=c * 64, size_bytes=10)


def evaluation(**kw) -> EvaluationCompleted:
    base = dict(checkpoint=ref("a"), checkpoint_digest="a" * 64, step=10, metrics={"val_loss": 2.0},
                verdict="pass", gates_passed=True, is_final=True)
    return EvaluationCompleted(**{**base, **kw})


def completed() -> TrainingCompleted:
    return TrainingCompleted(final_step=20, tokens_seen=1, final_loss=1.0, final_checkpoint=ref("b"),
                             final_checkpoint_digest="b" * 64, best_checkpoint=ref("c"), wall_time_s=1.0)


def test_unknown_fields_and_formats_are_refused():
    with pytest.raises(ValidationError):
        ExportConfig(formats=["native", "pickle"])
    with pytest.raises(ValidationError):
        ExportConfig(gguf_type=["q8_0"])  # typo of gguf_types
    with pytest.raises(ValidationError):
        ExportConfig(gguf_types=["q4_0"])
    with pytest.raises(ValidationError):
        ExportConfig(gguf_types=[])
    with pytest.raises(ValidationError):
        ExportConfig(formats=[])
    assert ExportConfig(formats=["hf", "hf"]).formats == ["hf"]


def test_gguf_types_default_to_what_the_readme_promises_and_take_bf16():
    assert ExportConfig().gguf_types == ["f32", "f16", "q8_0"]
    assert ExportConfig(gguf_types=["bf16", "f32", "bf16"]).gguf_types == ["bf16", "f32"]


def test_eval_passed_final_exports_only_a_passing_final_checkpoint():
    cfg = ExportConfig()
    assert checkpoint_to_export(cfg, evaluation()).digest == "a" * 64
    assert checkpoint_to_export(cfg, evaluation(is_final=False)) is None
    assert checkpoint_to_export(cfg, evaluation(verdict="regression", gates_passed=False)) is None
    assert checkpoint_to_export(cfg, completed()) is None


def test_eval_passed_best_exports_improvements_only():
    cfg = ExportConfig(checkpoint="best")
    assert checkpoint_to_export(cfg, evaluation(is_final=False)) is not None
    assert checkpoint_to_export(cfg, evaluation(is_final=False), best_val_loss=1.5) is None
    assert checkpoint_to_export(cfg, evaluation(is_final=False), best_val_loss=2.5) is not None


def test_training_completed_exports_final_or_best():
    assert checkpoint_to_export(ExportConfig(on="training_completed"), completed()).digest == "b" * 64
    assert checkpoint_to_export(ExportConfig(on="training_completed", checkpoint="best"), completed()).digest == "c" * 64
    assert checkpoint_to_export(ExportConfig(on="training_completed"), evaluation()) is None


def test_dataset_tokenizer_comes_from_a_prepared_dataset(tmp_path):
    from services.data_prep.pipeline import prepare_dataset
    from services.exporter.export import dataset_tokenizer
    from shared.artifacts import ArtifactStore
    from tests.data_prep.conftest import make_config, write_corpus

    write_corpus(tmp_path, n_prose=20, n_code=10)
    res = prepare_dataset(make_config(), ArtifactStore(tmp_path / "store"), base_dir=tmp_path)
    tok = dataset_tokenizer(res.manifest_path)
    assert tok.name == "tokenizer.model" and tok == dataset_tokenizer(res.manifest_path.parent)
