"""The streaming token dataset: exact resume across worker counts, weights, ranks, validation, corruption."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from services.data_prep.pipeline import prepare_dataset
from shared.artifacts import ArtifactStore
from shared.data.config import (
    CorpusConfig,
    CorpusSource,
    DataPrepConfig,
    FilterConfig,
    ShardingConfig,
    TokenizerConfig,
)
from shared.data.dataset import (
    BatchLoader,
    DatasetError,
    DatasetStateError,
    TokenDataset,
    permute,
    validation_batches,
)
from shared.data.manifest import ShardCorruptError, load_manifest
from tests.data_prep.conftest import shakespeare_paragraphs


def _code(i: int) -> str:
    rng = random.Random(i)
    body = "\n".join(
        f"def f{i}_{j}(x):\n    return x * {rng.randint(2, 99)} + {rng.randint(0, 999)}\n"
        for j in range(rng.randint(3, 8))
    )
    return f'"""Module {i}."""\n\n{body}'


@pytest.fixture(scope="module")
def manifest_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A two-domain dataset (prose, code) with several shards per domain and a validation split."""
    base = tmp_path_factory.mktemp("dataset")
    (base / "corpus" / "prose").mkdir(parents=True)
    (base / "corpus" / "code").mkdir(parents=True)
    paras = shakespeare_paragraphs(120)
    for i, p in enumerate(paras):
        (base / "corpus" / "prose" / f"{i:04d}.txt").write_text(p)
    for i in range(50):
        (base / "corpus" / "code" / f"{i:04d}.py").write_text(_code(i))
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
        sharding=ShardingConfig(shard_tokens=3_000, val_fraction=0.15, workers=1),
    )
    return prepare_dataset(cfg, ArtifactStore(base / "store"), base_dir=base).manifest_path


def stream(manifest_path: Path, split: str, domain: str) -> np.ndarray:
    m = load_manifest(manifest_path)
    return np.concatenate([
        np.fromfile(manifest_path.parent / s.path, dtype=s.dtype).astype(np.int64)
        for s in m.shards_for(split, domain)  # type: ignore[arg-type]
    ])


# A run: per step (batch size, seq len, weights to set before the step or None).
PLAN: list[tuple[int, int, dict[str, float] | None]] = (
    [(4, 32, None)] * 4
    + [(4, 32, {"prose": 0.2, "code": 0.8})]
    + [(4, 32, None)] * 3
    + [(2, 48, None)] * 3
    + [(3, 16, {"prose": 1.0})]
    + [(3, 16, None)] * 2
)


def run(loader: BatchLoader, plan: list[tuple[int, int, dict[str, float] | None]]) -> list[tuple[int, torch.Tensor]]:
    out = []
    for batch_size, seq_len, weights in plan:
        if weights is not None:
            loader.set_weights(weights)
        b = loader.next_batch(batch_size, seq_len)
        assert b.input_ids.shape == (batch_size, seq_len)
        out.append((b.cursor, torch.cat([b.input_ids, b.labels[:, -1:]], dim=1)))
    return out


@pytest.fixture(scope="module")
def reference(manifest_path: Path) -> list[tuple[int, torch.Tensor]]:
    loader = BatchLoader(TokenDataset(manifest_path, seed=3))
    return run(loader, PLAN)


@pytest.mark.parametrize(("workers_before", "workers_after", "stop"), [(0, 2, 6), (2, 0, 9), (2, 2, 3), (0, 0, 12)])
def test_resume_is_exact_across_worker_counts(
    manifest_path: Path, reference: list[tuple[int, torch.Tensor]], workers_before: int, workers_after: int, stop: int
) -> None:
    first = BatchLoader(TokenDataset(manifest_path, seed=3), num_workers=workers_before)
    seen = run(first, PLAN[:stop])
    state = json.loads(json.dumps(first.state_dict()))  # checkpoints store it as JSON
    first.close()
    second = BatchLoader(TokenDataset(manifest_path, seed=99), num_workers=workers_after)
    second.load_state_dict(state)
    # the resumed run keeps the batch shape of the step it stopped at, as the trainer would
    seen += run(second, PLAN[stop:])
    second.close()
    assert [c for c, _ in seen] == [c for c, _ in reference]
    for (_, got), (_, want) in zip(seen, reference, strict=True):
        assert torch.equal(got, want)


def test_dataloader_workers_give_the_same_batches_in_order(
    manifest_path: Path, reference: list[tuple[int, torch.Tensor]]
) -> None:
    loader = BatchLoader(TokenDataset(manifest_path, seed=3), num_workers=2, prefetch_factor=3)
    got = run(loader, PLAN)
    loader.close()
    assert all(torch.equal(a[1], b[1]) and a[0] == b[0] for a, b in zip(got, reference, strict=True))


def test_samples_are_next_token_windows_of_their_domain(manifest_path: Path) -> None:
    ds = TokenDataset(manifest_path, batch_size=6, seq_len=24, seed=1)
    b = BatchLoader(ds).next_batch()
    assert torch.equal(b.labels[:, :-1], b.input_ids[:, 1:])
    for row, d in zip(torch.cat([b.input_ids, b.labels[:, -1:]], dim=1), b.domain, strict=True):
        s = stream(manifest_path, "train", ds.domains[int(d)])
        starts = [k for k in range(0, s.size - 24, 24) if np.array_equal(s[k : k + 25], row.numpy())]
        assert starts, "row is not an aligned window of its domain's stream"


def test_a_domain_pass_visits_every_window_once(manifest_path: Path) -> None:
    ds = TokenDataset(manifest_path, batch_size=16, seq_len=64, weights={"code": 1.0})
    n = (ds.streams["code"].tokens - 1) // 64
    loader = BatchLoader(ds)
    rows = torch.cat([loader.next_batch().input_ids for _ in range(-(-n // 16))])[:n]
    assert len({tuple(r.tolist()) for r in rows}) == n


@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 1000, 1025])
def test_permute_is_a_bijection(n: int) -> None:
    out = permute(np.arange(n), n, key=12345)
    assert sorted(out.tolist()) == list(range(n))
    if n > 8:
        assert not np.array_equal(out, np.arange(n))


def test_rank_split_has_no_overlap_or_gap(manifest_path: Path) -> None:
    whole = BatchLoader(TokenDataset(manifest_path, batch_size=8, seq_len=16, seed=5))
    ranks = [
        BatchLoader(TokenDataset(manifest_path, batch_size=4, seq_len=16, seed=5, rank=r, world_size=2))
        for r in range(2)
    ]
    for _ in range(5):
        w = whole.next_batch()
        parts = [loader.next_batch() for loader in ranks]
        assert parts[0].cursor == parts[1].cursor == w.cursor
        assert torch.equal(torch.cat([p.input_ids for p in parts]), w.input_ids)
        assert torch.equal(torch.cat([p.domain for p in parts]), w.domain)
    assert ranks[0].cursor == ranks[1].cursor == whole.cursor == 40


def test_weights_steer_the_mixture_and_change_mid_run(manifest_path: Path) -> None:
    ds = TokenDataset(manifest_path, batch_size=250, seq_len=8, weights={"prose": 0.75, "code": 0.25}, seed=2)
    loader = BatchLoader(ds)
    prose = ds.domains.index("prose")
    doms = torch.cat([loader.next_batch().domain for _ in range(8)])
    assert abs(float((doms == prose).float().mean()) - 0.75) < 0.04
    loader.set_weights({"code": 1.0})
    assert ds.weights == {"code": 1.0, "prose": 0.0}
    assert all((loader.next_batch().domain != prose).all() for _ in range(3))
    schedule = loader.state_dict()["weight_schedule"]
    assert [e["cursor"] for e in schedule] == [0, 2000]


def test_default_weights_follow_tokens_with_temperature(manifest_path: Path) -> None:
    ds = TokenDataset(manifest_path)
    tokens = {d: ds.streams[d].tokens for d in ds.domains}
    total = sum(tokens.values())
    assert ds.weights == pytest.approx({d: t / total for d, t in tokens.items()})
    flat = ds.default_weights(temperature=1e6)
    assert flat == pytest.approx({d: 0.5 for d in ds.domains}, abs=1e-3)


def test_state_is_small_explicit_and_checked(manifest_path: Path) -> None:
    loader = BatchLoader(TokenDataset(manifest_path, seed=4))
    loader.next_batch(2, 16)
    state = loader.state_dict()
    assert len(json.dumps(state)) < 1_000
    assert state["cursor"] == 2 and sum(state["domain_counts"]) == 2 and state["seed"] == 4
    other = TokenDataset(manifest_path)
    with pytest.raises(DatasetStateError, match="dataset_version"):
        other.load_state_dict({**state, "dataset_version": "ds-other"})
    with pytest.raises(DatasetStateError, match="sampler"):
        other.load_state_dict({**state, "sampler": "something-else"})


def test_skip_moves_past_a_window(manifest_path: Path) -> None:
    a = BatchLoader(TokenDataset(manifest_path, batch_size=4, seq_len=16))
    b = BatchLoader(TokenDataset(manifest_path, batch_size=4, seq_len=16))
    for _ in range(3):
        a.next_batch()
    b.next_batch()
    b.skip(8)
    assert torch.equal(a.next_batch().input_ids, b.next_batch().input_ids)


def test_epochs_reorder_the_stream(manifest_path: Path) -> None:
    ds = TokenDataset(manifest_path, batch_size=4, seq_len=16)
    first = BatchLoader(ds).next_batch().input_ids
    ds.set_epoch(1)
    assert ds.cursor == 0
    assert not torch.equal(BatchLoader(ds).next_batch().input_ids, first)


def test_loss_mask_skips_predictions_across_documents(manifest_path: Path) -> None:
    ds = TokenDataset(manifest_path, batch_size=16, seq_len=64, mask_cross_document=True)
    b = BatchLoader(ds).next_batch()
    assert b.loss_mask is not None
    assert torch.equal(b.loss_mask == 0, b.input_ids == ds.eos_id)
    assert (b.loss_mask == 0).any()


def test_validation_yields_every_token_in_order_per_domain(manifest_path: Path) -> None:
    m = load_manifest(manifest_path)
    seen: dict[str, list[int]] = {}
    for domain, b in validation_batches(manifest_path, batch_size=3, seq_len=20):
        assert b.loss_mask is not None and (b.domain == m.domain_names.index(domain)).all()
        seen.setdefault(domain, []).extend(b.labels[b.loss_mask.bool()].tolist())
    assert set(seen) == {d for d in m.domains if m.shards_for("val", d)}
    for domain, labels in seen.items():
        assert labels == stream(manifest_path, "val", domain)[1:].tolist()


def test_bad_arguments_name_the_problem(manifest_path: Path) -> None:
    with pytest.raises(DatasetError, match="unknown domain"):
        TokenDataset(manifest_path, weights={"poetry": 1.0})
    with pytest.raises(DatasetError, match="rank"):
        TokenDataset(manifest_path, rank=2, world_size=2)
    ds = TokenDataset(manifest_path, weights={"code": 1.0})
    with pytest.raises(DatasetError, match=r"'code'.*seq_len"):
        BatchLoader(ds).next_batch(1, 10**7)


def corrupt_copy(manifest_path: Path, tmp_path: Path) -> tuple[Path, Any]:
    root = tmp_path / "copy"
    shutil.copytree(manifest_path.parent, root)
    shard = load_manifest(root / "manifest.json").shards[2]
    return root / "manifest.json", shard


def test_flipped_byte_fails_a_full_check_naming_the_shard(manifest_path: Path, tmp_path: Path) -> None:
    copy, shard = corrupt_copy(manifest_path, tmp_path)
    path = copy.parent / shard.path
    data = bytearray(path.read_bytes())
    data[5] ^= 0xFF
    path.write_bytes(bytes(data))
    TokenDataset(copy)  # the cheap size check cannot see a flipped byte
    with pytest.raises(ShardCorruptError, match=shard.path):
        TokenDataset(copy, verify="full")


def test_truncated_shard_fails_on_open(manifest_path: Path, tmp_path: Path) -> None:
    copy, shard = corrupt_copy(manifest_path, tmp_path)
    path = copy.parent / shard.path
    path.write_bytes(path.read_bytes()[:-2])
    with pytest.raises(ShardCorruptError, match=shard.path):
        TokenDataset(copy)


def test_loader_is_the_trainers_batch_source(manifest_path: Path) -> None:
    from services.trainer.data import BatchSource

    loader = BatchLoader(TokenDataset(manifest_path, batch_size=2, seq_len=16, mask_cross_document=True))
    assert isinstance(loader, BatchSource)
    batch = next(iter(loader))
    assert set(batch) == {"input_ids", "labels", "domain", "loss_mask"}
    loader.set_seq_len(24)
    loader.set_batch_size(3)
    assert next(loader)["input_ids"].shape == (3, 24)
    assert loader.cursor == 5


def test_state_restores_batch_shape(manifest_path: Path) -> None:
    a = BatchLoader(TokenDataset(manifest_path, batch_size=2, seq_len=16))
    a.next_batch(3, 40)
    state = a.state_dict()
    want = a.next_batch()
    b = BatchLoader(TokenDataset(manifest_path))
    b.load_state_dict(state)
    got = b.next_batch()
    assert got.input_ids.shape == (3, 40) and torch.equal(got.input_ids, want.input_ids)
