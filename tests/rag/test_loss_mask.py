"""The trainer honours the packed dataset's loss mask: on a tiny model, the targets of retrieved
tokens do not change the loss or the update (rag.context_loss_weight 0); with a weight they do."""

from __future__ import annotations

from pathlib import Path

import torch

from services.trainer.hooks import Callback
from services.trainer.job import train_config_for_manifest
from services.trainer.loop import Trainer
from shared.data.dataset import BatchLoader, TokenDataset
from shared.data.manifest import MASK_CONTEXT
from tests.trainer.helpers import make_config

from .conftest import prepare, rag_config


class ScrambledContextTargets(BatchLoader):
    """The same batches with every retrieved label replaced by another token."""

    def __next__(self) -> dict[str, torch.Tensor]:
        batch = super().__next__()
        ctx = batch["token_kind"] == MASK_CONTEXT
        assert ctx.any()
        labels = batch["labels"].clone()
        labels[ctx] = (labels[ctx] * 7 + 11) % 300 + 7  # ids above the special and boundary ones
        return {**batch, "labels": labels}


def step_once(manifest: Path, out: Path, loader: type[BatchLoader]) -> tuple[float, torch.Tensor]:
    train = make_config(max_steps=1, batch={"global_batch_size": 8, "micro_batch_size": 4, "seq_len": 96})
    cfg = train_config_for_manifest(train.model_dump(mode="json"), manifest)
    data = loader(TokenDataset(manifest, "train", batch_size=4, seq_len=96, seed=0))
    torch.manual_seed(0)
    trainer = Trainer(cfg, data, out)
    result = trainer.train_step()
    params = torch.cat([p.detach().flatten() for p in trainer.raw_model.parameters()])
    return result.loss, params


def test_retrieved_targets_do_not_change_the_loss_or_the_update(corpus_root: Path, tmp_path: Path) -> None:
    manifest = prepare(corpus_root, rag_config(seq_len=96)).manifest_path
    loss, params = step_once(manifest, tmp_path / "a", BatchLoader)
    loss_s, params_s = step_once(manifest, tmp_path / "b", ScrambledContextTargets)
    assert loss == loss_s and torch.equal(params, params_s)


def test_with_a_context_loss_weight_the_retrieved_targets_count(corpus_root: Path, tmp_path: Path) -> None:
    manifest = prepare(corpus_root, rag_config(seq_len=96, context_loss_weight=0.5)).manifest_path
    loss, _ = step_once(manifest, tmp_path / "a", BatchLoader)
    loss_s, _ = step_once(manifest, tmp_path / "b", ScrambledContextTargets)
    assert loss != loss_s  # the same test can fail: the mask is what makes the first one pass


class Logged(Callback):
    def __init__(self) -> None:
        self.metrics: list[dict] = []

    def on_log(self, trainer, metrics) -> None:
        self.metrics.append(metrics)


def test_the_trainer_reports_base_token_loss_and_the_retrieved_share(corpus_root: Path, tmp_path: Path) -> None:
    result = prepare(corpus_root, rag_config(seq_len=96, context_loss_weight=0.5))
    train = make_config(max_steps=2, batch={"global_batch_size": 8, "micro_batch_size": 4, "seq_len": 96},
                        log={"every": 1})
    cfg = train_config_for_manifest(train.model_dump(mode="json"), result.manifest_path)
    logged = Logged()
    data = BatchLoader(TokenDataset(result.manifest_path, "train", batch_size=4, seq_len=96, seed=0))
    Trainer(cfg, data, tmp_path / "run", callbacks=[logged]).fit()
    last = logged.metrics[-1]
    share = result.manifest.rag.tokens["context"] / sum(result.manifest.rag.tokens.values())
    assert 0.5 * share < last["retrieved_fraction"] < 1.5 * share
    assert last["probes"]["rag.retrieved_fraction"] == last["retrieved_fraction"]
    # With retrieved tokens at weight 0.5 the objective mixes them in; the base-token loss is apart.
    assert last["loss_base"] != last["loss"] and last["probes"]["rag.loss_base"] == last["loss_base"]
