"""Streaming token dataset over the shards of a prepared dataset (np.memmap, never loaded whole).

Sampling model. Sample ``i`` of an epoch (a global index, the *cursor* counts them) is a
pure function of (seed, epoch, i, the weights in force at i, seq_len, and how many samples
of its domain came before it):

- its domain is drawn with a counter-based RNG, uniform ``u_i = splitmix64(key + i)``,
  against the cumulative domain weights in force at ``i``;
- the k-th sample of domain d takes window ``perm(k mod n)`` of that domain's token stream,
  where ``n = (tokens - 1) // seq_len`` non-overlapping windows of seq_len + 1 tokens exist and
  ``perm`` is a seeded bijection of [0, n), reshuffled each time the domain wraps around.

Nothing depends on the number of ranks or DataLoader workers, so the resume state is
small: (seed, epoch, cursor, per-domain sample counts, the weight schedule). A global
batch of ``batch_size * world_size`` samples starts at the cursor; rank r takes its
contiguous slice. With DataLoader workers, worker w produces the batches j = w (mod W) of
its iterator, so the DataLoader's round-robin order hands out batches in cursor order.

RAG-packed datasets (``manifest.rag``): a domain's stream is a run of fixed records of
``rag.record_tokens`` tokens (see shared.data.manifest); the k-th sample takes record
``perm(k mod n)`` of the n records, the same counter-based way. A shorter window (the
curriculum's seq_len below rag.seq_len) is cut from the record by `crop_window`: the retrieved
part goes first, the base text's targets last. Batches then carry `loss_mask` (the kinds'
weights, rag.weights) and `token_kind` (the kind of each label: 0 pad, 1 retrieved, 2 base).

Use `BatchLoader` in the trainer (it implements the trainer's BatchSource protocol): it owns
the cursor. A batch only counts once the trainer received it; prefetched batches that were
never consumed are thrown away when the weights, batch size or sequence length change (the
workers are restarted from the consumed cursor), so a change takes effect exactly at the
next batch and resume is exact.
"""

from __future__ import annotations

import bisect
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from shared.data.manifest import (
    MANIFEST_NAME,
    MASK_BASE,
    MASK_CONTEXT,
    Manifest,
    ShardInfo,
    Split,
    check_shard,
    load_manifest,
)

SAMPLER = "splitmix64-counter/v1"
"""Identifies the sampling algorithm in resume states: a state from another sampler is refused."""

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_U64 = np.uint64


class DatasetError(ValueError):
    """The dataset cannot serve what was asked (unknown domain, too few tokens, bad argument)."""


class DatasetStateError(DatasetError):
    """A resume state does not belong to this dataset or sampler."""


# --- counter-based randomness -----------------------------------------------------------


def _mix(x: int) -> int:
    """splitmix64's finaliser on a Python int."""
    x &= _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _key(*parts: int) -> int:
    h = 0
    for p in parts:
        h = _mix(h ^ (p & _MASK64) ^ _GOLDEN)
    return h


def _mix_array(x: np.ndarray) -> np.ndarray:
    x = x ^ (x >> _U64(30))
    x *= _U64(0xBF58476D1CE4E5B9)
    x ^= x >> _U64(27)
    x *= _U64(0x94D049BB133111EB)
    x ^= x >> _U64(31)
    return x


def _uniform(key: int, index: np.ndarray) -> np.ndarray:
    """u_i in [0, 1) for each index: the i-th output of a splitmix64 stream seeded with key."""
    state = _U64(key) + (index.astype(_U64) + _U64(1)) * _U64(_GOLDEN)
    return (_mix_array(state) >> _U64(11)).astype(np.float64) * 2.0**-53


def permute(x: np.ndarray, n: int, key: int) -> np.ndarray:
    """A seeded bijection of [0, n) applied to x (rounds of multiply/add/xorshift + cycle walking)."""
    x = x.astype(_U64)
    if n <= 1:
        return np.zeros_like(x)
    bits = max(2, (n - 1).bit_length())
    mask = _U64((1 << bits) - 1)
    shift = _U64((bits + 1) // 2)
    rounds = [(_key(key, r) | 1, _key(key, r, 1)) for r in range(4)]

    def once(v: np.ndarray) -> np.ndarray:
        for a, c in rounds:
            v = (v * _U64(a & _MASK64) + _U64(c & _MASK64)) & mask
            v ^= v >> shift
        return v

    y = once(x)
    out_of_range = y >= n
    while out_of_range.any():  # 2^bits < 2n: a walk ends after two steps on average
        y[out_of_range] = once(y[out_of_range])
        out_of_range = y >= n
    return y


# --- token streams ----------------------------------------------------------------------


class DomainStream:
    """One domain's shards of a split as one virtual token array (memmaps opened lazily per process)."""

    def __init__(self, root: Path, name: str, shards: list[ShardInfo]) -> None:
        self.root, self.name, self.shards = root, name, shards
        self.offsets = np.cumsum([0] + [s.tokens for s in shards])
        self.tokens = int(self.offsets[-1])
        self._maps: list[np.memmap] | None = None
        self._masks: list[np.memmap] | None = None
        self._pid = -1

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_maps": None, "_masks": None, "_pid": -1}  # memmaps are reopened, not pickled

    def _arrays(self, masks: bool = False) -> list[np.memmap]:
        if self._maps is None or self._pid != os.getpid():
            self._maps = [np.memmap(self.root / s.path, dtype=s.dtype, mode="r") for s in self.shards]
            self._masks = None
            self._pid = os.getpid()
        if not masks:
            return self._maps
        if self._masks is None:
            missing = [s.path for s in self.shards if s.mask is None]
            if missing:
                raise DatasetError(f"shard(s) {missing} of domain {self.name!r} have no mask file")
            self._masks = [np.memmap(self.root / s.mask.path, dtype=np.uint8, mode="r") for s in self.shards]  # type: ignore[union-attr]
        return self._masks

    def read_kinds(self, start: int, length: int) -> np.ndarray:
        """Token kinds [start, start + length) of a packed stream (its mask files) as uint8."""
        return self.read(start, length, masks=True).astype(np.uint8)

    def read(self, start: int, length: int, masks: bool = False) -> np.ndarray:
        """Tokens [start, start + length) as int64, across shard boundaries (masks: the kinds instead)."""
        if start < 0 or start + length > self.tokens:
            raise DatasetError(f"read [{start}, {start + length}) outside domain {self.name!r} ({self.tokens} tokens)")
        out = np.empty(length, dtype=np.int64)
        arrays = self._arrays(masks)
        i = int(np.searchsorted(self.offsets, start, side="right")) - 1
        pos, filled = start, 0
        while filled < length:
            lo = pos - int(self.offsets[i])
            take = min(length - filled, self.shards[i].tokens - lo)
            out[filled : filled + take] = arrays[i][lo : lo + take]
            filled += take
            pos += take
            i += 1
        return out


def open_streams(
    manifest_path: str | Path, split: Split, verify: Literal["size", "full"] = "size"
) -> tuple[Manifest, dict[str, DomainStream]]:
    """The manifest and one stream per domain of a split; shards are checked on open.

    verify="size" checks every shard's size (cheap); "full" also re-hashes it. A bad shard
    raises ShardCorruptError naming the file.
    """
    mpath = Path(manifest_path)
    if mpath.is_dir():
        mpath = mpath / MANIFEST_NAME
    manifest = load_manifest(mpath)
    root = mpath.parent
    for shard in manifest.shards_for(split):
        check_shard(root, shard, full=verify == "full")
    streams = {}
    for name in manifest.domain_names:
        shards = manifest.shards_for(split, name)
        if shards:
            streams[name] = DomainStream(root, name, shards)
    return manifest, streams


def crop_window(tokens: np.ndarray, kinds: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
    """`length` tokens of a packed record (and their kinds), the retrieved part cut first.

    When the marker and the base text fit, the record's last `length` tokens (context, then
    padding, cut from the front); otherwise the marker and the first length - 1 base tokens.
    """
    n = len(tokens)
    if length >= n:
        return tokens, kinds
    base = np.flatnonzero(kinds == MASK_BASE)
    marker = int(base[0]) - 1 if base.size else n - length
    if n - marker <= length:
        return tokens[n - length :], kinds[n - length :]
    return tokens[marker : marker + length], kinds[marker : marker + length]


# --- batches ----------------------------------------------------------------------------


@dataclass
class Batch:
    """One rank's part of a global batch: next-token prediction pairs and their domains."""

    input_ids: torch.Tensor  # (B, T) int64
    labels: torch.Tensor  # (B, T) int64, input_ids shifted by one
    domain: torch.Tensor  # (B,) int64, index into TokenDataset.domains
    cursor: int  # global index of the first sample of the global batch
    loss_mask: torch.Tensor | None = None  # (B, T) float32, 0 where a label must not count
    token_kind: torch.Tensor | None = None  # (B, T) uint8, packed datasets: each label's kind (0 pad, 1 ctx, 2 base)

    @property
    def tokens(self) -> int:
        return self.input_ids.numel()

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        move = lambda t: None if t is None else t.to(device, non_blocking=non_blocking)  # noqa: E731
        return replace(self, input_ids=move(self.input_ids), labels=move(self.labels), domain=move(self.domain),
                       loss_mask=move(self.loss_mask), token_kind=move(self.token_kind))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Batch:
        return cls(d["input_ids"], d["labels"], d["domain"], int(d["cursor"]), d.get("loss_mask"),
                   d.get("token_kind"))


@dataclass
class _Snapshot:
    """Everything an iterator needs, frozen when it starts (workers get a copy)."""

    cursor: int
    counts: np.ndarray
    schedule: list[tuple[int, np.ndarray]]  # (cursor, cumulative weights)
    batch_size: int
    seq_len: int


class TokenDataset(IterableDataset):
    """Infinite weighted stream of fixed-length training samples, yielded as whole batches (dicts).

    Iterating yields this rank's part of consecutive global batches from the current cursor;
    it does not move the cursor: `advance` (called by BatchLoader) does, once a batch is consumed.
    """

    def __init__(
        self,
        manifest_path: str | Path,
        split: Split = "train",
        *,
        batch_size: int = 8,
        seq_len: int = 256,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        weights: Mapping[str, float] | None = None,
        temperature: float = 1.0,
        mask_cross_document: bool = False,
        verify: Literal["size", "full"] = "size",
    ) -> None:
        super().__init__()
        if not 0 <= rank < world_size:
            raise DatasetError(f"rank {rank} is not in [0, world_size={world_size})")
        if temperature <= 0:
            raise DatasetError(f"temperature must be > 0, got {temperature}")
        self.manifest, self.streams = open_streams(manifest_path, split, verify)
        if not self.streams:
            raise DatasetError(f"dataset {self.manifest.version} has no {split} tokens")
        self.split = split
        self.rag = self.manifest.rag
        self.domains = self.manifest.domain_names  # all domains, so indices agree across splits
        self.eos_id = self.manifest.tokenizer.eos_id
        self.rank, self.world_size = rank, world_size
        self.seed = seed
        self.mask_cross_document = mask_cross_document
        self.epoch = 0
        self.cursor = 0
        self.counts = np.zeros(len(self.domains), dtype=np.int64)
        self.schedule: list[tuple[int, np.ndarray]] = []
        self.configure(batch_size, seq_len)
        self.set_weights(weights if weights is not None else self.default_weights(temperature))

    # -- weights -----------------------------------------------------------------------

    def default_weights(self, temperature: float = 1.0) -> dict[str, float]:
        """Weights proportional to tokens ** (1 / temperature): 1 is proportional, large is uniform."""
        tokens = np.array([self.streams[d].tokens if d in self.streams else 0 for d in self.domains], dtype=np.float64)
        w = tokens ** (1.0 / temperature)
        return dict(zip(self.domains, (w / w.sum()).tolist(), strict=True))

    @property
    def weights(self) -> dict[str, float]:
        """The weights in force at the cursor (normalised)."""
        cdf = self._cdf_at(self.cursor)
        w = np.diff(np.concatenate(([0.0], cdf)))
        return dict(zip(self.domains, w.tolist(), strict=True))

    def set_weights(self, weights: Mapping[str, float]) -> None:
        """Domain weights from the current cursor on (missing domains get 0); recorded in the state."""
        unknown = sorted(set(weights) - set(self.domains))
        if unknown:
            raise DatasetError(f"unknown domain(s) {unknown}: this dataset's {self.split} domains are {self.domains}")
        w = np.array([float(weights.get(d, 0.0)) for d in self.domains])
        if not np.all(np.isfinite(w)) or (w < 0).any() or w.sum() <= 0:
            raise DatasetError(f"domain weights must be finite, >= 0 and not all 0, got {dict(weights)}")
        empty = [d for d, x in zip(self.domains, w, strict=True) if x > 0 and d not in self.streams]
        if empty:
            raise DatasetError(f"domain(s) {empty} have no {self.split} tokens: give them weight 0")
        cdf = np.cumsum(w / w.sum())
        cdf[int(np.flatnonzero(w)[-1]) :] = 1.0  # rounding must not leave room for a zero-weight tail
        if self.schedule and self.schedule[-1][0] == self.cursor:
            self.schedule[-1] = (self.cursor, cdf)
        else:
            self.schedule.append((self.cursor, cdf))

    def _cdf_at(self, index: int) -> np.ndarray:
        starts = [c for c, _ in self.schedule]
        return self.schedule[bisect.bisect_right(starts, index) - 1][1]

    # -- configuration and state -------------------------------------------------------

    def configure(self, batch_size: int, seq_len: int) -> None:
        """Per-rank batch size and sequence length of the batches iteration yields."""
        if batch_size < 1 or seq_len < 1:
            raise DatasetError(f"batch_size and seq_len must be >= 1, got {batch_size}, {seq_len}")
        if self.rag is not None and seq_len > self.rag.seq_len:
            raise DatasetError(
                f"seq_len {seq_len} is longer than the packed windows of dataset {self.manifest.version} "
                f"(rag.seq_len = {self.rag.seq_len}): lower train.batch.seq_len or raise data.rag.seq_len"
            )
        self.batch_size, self.seq_len = batch_size, seq_len

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.world_size

    def set_epoch(self, epoch: int) -> None:
        """Start epoch `epoch`: a new sample order, cursor and counts back to 0, current weights kept."""
        cdf = self._cdf_at(self.cursor)
        self.epoch, self.cursor = epoch, 0
        self.counts[:] = 0
        self.schedule = [(0, cdf)]

    def state_dict(self) -> dict[str, Any]:
        """Resume state (JSON-serialisable, a few hundred bytes)."""
        return {
            "sampler": SAMPLER,
            "dataset_version": self.manifest.version,
            "split": self.split,
            "seed": self.seed,
            "epoch": self.epoch,
            "cursor": self.cursor,
            "domains": list(self.domains),
            "domain_counts": self.counts.tolist(),
            "weight_schedule": [
                {"cursor": c, "weights": np.diff(np.concatenate(([0.0], cdf))).tolist()} for c, cdf in self.schedule
            ],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a state_dict(); refuses one from another dataset version, split or sampler."""
        for name, mine in (("sampler", SAMPLER), ("dataset_version", self.manifest.version), ("split", self.split),
                           ("domains", list(self.domains))):
            if state.get(name) != mine:
                raise DatasetStateError(
                    f"resume state has {name}={state.get(name)!r}, this dataset has {mine!r}: "
                    "resume with the dataset the checkpoint was trained on"
                )
        self.seed, self.epoch, self.cursor = int(state["seed"]), int(state["epoch"]), int(state["cursor"])
        self.counts = np.asarray(state["domain_counts"], dtype=np.int64)
        self.schedule = []
        for entry in state["weight_schedule"]:
            w = np.asarray(entry["weights"], dtype=np.float64)
            cdf = np.cumsum(w / w.sum())
            cdf[int(np.flatnonzero(w)[-1]) :] = 1.0
            self.schedule.append((int(entry["cursor"]), cdf))

    def advance(self, num_samples: int) -> None:
        """Move the cursor past num_samples global samples (a consumed batch, or a skipped window)."""
        if num_samples < 0:
            raise DatasetError(f"cannot advance by {num_samples} samples")
        doms = self._domains(self.cursor, num_samples, self.schedule)
        self.counts += np.bincount(doms, minlength=len(self.domains))
        self.cursor += num_samples

    # -- sampling ----------------------------------------------------------------------

    def _domains(self, start: int, count: int, schedule: list[tuple[int, np.ndarray]]) -> np.ndarray:
        """Domain index of global samples [start, start + count)."""
        index = np.arange(start, start + count, dtype=np.int64)
        u = _uniform(_key(self.seed, self.epoch, 0xD0), index)
        out = np.empty(count, dtype=np.int64)
        starts = [c for c, _ in schedule]
        first = bisect.bisect_right(starts, start) - 1
        for s in range(max(first, 0), len(schedule)):
            lo = max(schedule[s][0], start) - start
            hi = (schedule[s + 1][0] - start) if s + 1 < len(schedule) else count
            if hi <= 0 or lo >= count:
                continue
            lo, hi = max(lo, 0), min(hi, count)
            out[lo:hi] = np.searchsorted(schedule[s][1], u[lo:hi], side="right")
        return np.minimum(out, len(self.domains) - 1)

    def _windows(self, d: int, k: np.ndarray, seq_len: int) -> np.ndarray:
        """Start token of the window of the k-th samples of domain d."""
        stream = self.streams[self.domains[d]]
        if self.rag is not None:  # whole records, whatever the (cropped) seq_len
            seq_len = self.rag.record_tokens
            n = stream.tokens // seq_len
        else:
            n = (stream.tokens - 1) // seq_len
        if n < 1:
            raise DatasetError(
                f"domain {stream.name!r} has {stream.tokens} {self.split} tokens, fewer than seq_len + 1 = "
                f"{seq_len + 1}: lower seq_len or give it weight 0"
            )
        out = np.empty(k.size, dtype=np.int64)
        rounds = k // n
        for r in np.unique(rounds):
            sel = rounds == r
            out[sel] = permute(k[sel] % n, n, _key(self.seed, self.epoch, d, int(r))).astype(np.int64)
        return out * seq_len

    def _batch(self, cursor: int, counts: np.ndarray, snap: _Snapshot) -> dict[str, torch.Tensor]:
        """This rank's samples of the global batch starting at cursor (counts: domain counts there)."""
        g = snap.batch_size * self.world_size
        doms = self._domains(cursor, g, snap.schedule)
        ks = np.empty(g, dtype=np.int64)
        for d in np.unique(doms):
            sel = doms == d
            ks[sel] = counts[d] + np.arange(int(sel.sum()))
        part = slice(self.rank * snap.batch_size, (self.rank + 1) * snap.batch_size)
        doms, ks = doms[part], ks[part]
        starts = np.empty_like(ks)
        for d in np.unique(doms):
            sel = doms == d
            starts[sel] = self._windows(int(d), ks[sel], snap.seq_len)
        if self.rag is not None:
            return self._packed_batch(doms, starts, cursor, snap.seq_len)
        rows = np.stack([
            self.streams[self.domains[d]].read(int(s), snap.seq_len + 1) for d, s in zip(doms, starts, strict=True)
        ])
        tokens = torch.from_numpy(rows)
        out = {
            "input_ids": tokens[:, :-1].contiguous(),
            "labels": tokens[:, 1:].contiguous(),
            "domain": torch.from_numpy(doms),
            "cursor": torch.tensor(cursor),
        }
        if self.mask_cross_document:
            # predicting a document's first token from the previous document teaches nothing
            out["loss_mask"] = (out["input_ids"] != self.eos_id).float()
        return out

    def _packed_batch(self, doms: np.ndarray, starts: np.ndarray, cursor: int, seq_len: int) -> dict[str, torch.Tensor]:
        assert self.rag is not None
        rows, kinds = [], []
        for d, s in zip(doms, starts, strict=True):
            stream = self.streams[self.domains[d]]
            tok, kind = crop_window(stream.read(int(s), self.rag.record_tokens),
                                    stream.read_kinds(int(s), self.rag.record_tokens), seq_len + 1)
            rows.append(tok)
            kinds.append(kind)
        tokens = torch.from_numpy(np.stack(rows))
        label_kind = torch.from_numpy(np.stack(kinds)[:, 1:].copy())
        mask = torch.tensor(self.rag.weights, dtype=torch.float32)[label_kind.long()]
        out = {
            "input_ids": tokens[:, :-1].contiguous(),
            "labels": tokens[:, 1:].contiguous(),
            "domain": torch.from_numpy(doms),
            "cursor": torch.tensor(cursor),
            "loss_mask": mask,
            "token_kind": label_kind,
        }
        if self.mask_cross_document:
            out["loss_mask"] = out["loss_mask"] * (out["input_ids"] != self.eos_id).float()
        return out

    def snapshot(self) -> _Snapshot:
        return _Snapshot(self.cursor, self.counts.copy(), list(self.schedule), self.batch_size, self.seq_len)

    def batch_at(self, cursor: int | None = None) -> dict[str, torch.Tensor]:
        """The batch at the cursor (default: the current one), computed directly."""
        snap = self.snapshot()
        if cursor is None or cursor == snap.cursor:
            return self._batch(snap.cursor, snap.counts, snap)
        if cursor < snap.cursor:
            raise DatasetError(f"cursor {cursor} is behind the dataset's cursor {snap.cursor}")
        doms = self._domains(snap.cursor, cursor - snap.cursor, snap.schedule)
        return self._batch(cursor, snap.counts + np.bincount(doms, minlength=len(self.domains)), snap)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        snap = self.snapshot()
        return self._iterate(snap, worker, workers)

    def _iterate(self, snap: _Snapshot, worker: int, workers: int) -> Iterator[dict[str, torch.Tensor]]:
        cursor, counts = snap.cursor, snap.counts.copy()
        g = snap.batch_size * self.world_size
        j = 0
        while True:
            if j % workers == worker:
                yield self._batch(cursor, counts, snap)
            counts += np.bincount(self._domains(cursor, g, snap.schedule), minlength=len(self.domains))
            cursor += g
            j += 1


class BatchLoader:
    """The trainer's data source: batches in cursor order, exact resume, live changes.

    Implements the trainer's BatchSource protocol: iterating yields batch dicts
    (input_ids, labels, domain and, when enabled, loss_mask); `next_batch` returns a typed
    Batch. Each batch is this rank's part of the next global batch and moves the cursor by
    batch_size * world_size. Changing the weights, batch size or sequence length restarts
    the DataLoader workers from the consumed cursor, so prefetched batches never leak
    across a change.
    """

    def __init__(
        self, dataset: TokenDataset, num_workers: int = 0, prefetch_factor: int = 2, pin_memory: bool = False,
        multiprocessing_context: str | None = None,
    ) -> None:
        self.dataset = dataset
        self.domains = dataset.domains
        self.num_workers = num_workers
        self.prefetch_factor = prefetch_factor
        self.pin_memory = pin_memory
        self.multiprocessing_context = multiprocessing_context
        self._it: Iterator[dict[str, torch.Tensor]] | None = None

    @property
    def cursor(self) -> int:
        """Global samples consumed so far (all ranks)."""
        return self.dataset.cursor

    @property
    def weights(self) -> dict[str, float]:
        return self.dataset.weights

    @property
    def batch_size(self) -> int:
        return self.dataset.batch_size

    @property
    def seq_len(self) -> int:
        return self.dataset.seq_len

    def _restart(self) -> None:
        self.close()
        if self.num_workers == 0:
            self._it = iter(self.dataset)
        else:
            loader = DataLoader(
                self.dataset, batch_size=None, num_workers=self.num_workers, prefetch_factor=self.prefetch_factor,
                pin_memory=self.pin_memory, multiprocessing_context=self.multiprocessing_context,
            )
            self._it = iter(loader)

    def next_batch(self, batch_size: int | None = None, seq_len: int | None = None) -> Batch:
        """The next batch; batch_size (per rank) and seq_len default to the current ones."""
        if batch_size is not None and batch_size != self.dataset.batch_size:
            self.set_batch_size(batch_size)
        if seq_len is not None and seq_len != self.dataset.seq_len:
            self.set_seq_len(seq_len)
        if self._it is None:
            self._restart()
        assert self._it is not None
        batch = Batch.from_dict(next(self._it))
        if batch.cursor != self.dataset.cursor:  # a broken invariant, not a user error
            raise RuntimeError(f"batch at cursor {batch.cursor} arrived while the cursor is {self.dataset.cursor}")
        self.dataset.advance(self.dataset.global_batch_size)
        return batch

    def __iter__(self) -> BatchLoader:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        b = self.next_batch()
        out = {"input_ids": b.input_ids, "labels": b.labels, "domain": b.domain}
        if b.loss_mask is not None:
            out["loss_mask"] = b.loss_mask
        if b.token_kind is not None:
            out["token_kind"] = b.token_kind
        return out

    def set_batch_size(self, batch_size: int) -> None:
        """Per-rank batch size from the next batch on."""
        self.dataset.configure(batch_size, self.dataset.seq_len)
        self.close()

    def set_seq_len(self, seq_len: int) -> None:
        """Sequence length from the next batch on (curriculum)."""
        self.dataset.configure(self.dataset.batch_size, seq_len)
        self.close()

    def set_weights(self, weights: Mapping[str, float]) -> None:
        """Domain weights from the next batch on (normalised; recorded in the state)."""
        self.dataset.set_weights(weights)
        self.close()

    def skip(self, n_samples: int) -> None:
        """Advance the cursor by n global samples without reading them (e.g. a window blamed for a spike)."""
        self.dataset.advance(n_samples)
        self.close()

    def state_dict(self) -> dict[str, Any]:
        """The dataset's resume state plus the current batch size and sequence length."""
        return {**self.dataset.state_dict(), "batch_size": self.dataset.batch_size, "seq_len": self.dataset.seq_len}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.dataset.load_state_dict(state)
        if "batch_size" in state and "seq_len" in state:
            self.dataset.configure(int(state["batch_size"]), int(state["seq_len"]))
        self.close()

    def close(self) -> None:
        """Stop the workers (prefetched batches are dropped; the cursor is unaffected)."""
        it, self._it = self._it, None
        shutdown = getattr(it, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()


# --- validation -------------------------------------------------------------------------


def validation_batches(
    manifest_path: str | Path,
    batch_size: int,
    seq_len: int,
    domains: list[str] | None = None,
    *,
    split: Split = "val",
    verify: Literal["size", "full"] = "size",
) -> Iterator[tuple[str, Batch]]:
    """Every validation token, in order, per domain: (domain, batch) pairs.

    Windows of seq_len + 1 tokens overlap by one, so every token but a domain's first is a
    label exactly once. The last window is padded with the pad id and masked out (loss_mask 0);
    batches never mix domains. `Batch.cursor` is the window index within the domain.

    A packed dataset yields its records in order (cropped by `crop_window` to seq_len + 1):
    every base token is a label exactly once; loss_mask counts the base labels only (whatever
    rag.context_loss_weight), and token_kind says what each label is.
    """
    manifest, streams = open_streams(manifest_path, split, verify)
    if manifest.rag is not None:
        yield from _packed_validation_batches(manifest, streams, batch_size, seq_len, domains, split)
        return
    pad = max(manifest.tokenizer.pad_id, 0)
    names = domains if domains is not None else sorted(streams)
    unknown = sorted(set(names) - set(streams))
    if unknown:
        raise DatasetError(f"no {split} tokens for domain(s) {unknown}; available: {sorted(streams)}")
    for name in names:
        d = manifest.domain_names.index(name)
        stream = streams[name]
        n_windows = -(-(stream.tokens - 1) // seq_len) if stream.tokens > 1 else 0
        for first in range(0, n_windows, batch_size):
            rows = []
            masks = []
            for w in range(first, min(first + batch_size, n_windows)):
                lo = w * seq_len
                length = min(seq_len + 1, stream.tokens - lo)
                row = np.full(seq_len + 1, pad, dtype=np.int64)
                row[:length] = stream.read(lo, length)
                mask = np.zeros(seq_len, dtype=np.float32)
                mask[: length - 1] = 1.0
                rows.append(row)
                masks.append(mask)
            tokens = torch.from_numpy(np.stack(rows))
            yield name, Batch(
                input_ids=tokens[:, :-1].contiguous(), labels=tokens[:, 1:].contiguous(),
                domain=torch.full((len(rows),), d, dtype=torch.int64), cursor=first,
                loss_mask=torch.from_numpy(np.stack(masks)),
            )


def _packed_validation_batches(
    manifest: Manifest, streams: dict[str, DomainStream], batch_size: int, seq_len: int,
    domains: list[str] | None, split: Split,
) -> Iterator[tuple[str, Batch]]:
    rag = manifest.rag
    assert rag is not None
    if seq_len > rag.seq_len:
        raise DatasetError(f"seq_len {seq_len} is longer than the packed windows of dataset {manifest.version} "
                           f"(rag.seq_len = {rag.seq_len})")
    names = domains if domains is not None else sorted(streams)
    unknown = sorted(set(names) - set(streams))
    if unknown:
        raise DatasetError(f"no {split} tokens for domain(s) {unknown}; available: {sorted(streams)}")
    W = rag.record_tokens
    for name in names:
        d = manifest.domain_names.index(name)
        stream = streams[name]
        n = stream.tokens // W
        for first in range(0, n, batch_size):
            rows, kinds = [], []
            for r in range(first, min(first + batch_size, n)):
                tok, kind = crop_window(stream.read(r * W, W), stream.read_kinds(r * W, W), seq_len + 1)
                rows.append(tok)
                kinds.append(kind)
            tokens = torch.from_numpy(np.stack(rows))
            label_kind = torch.from_numpy(np.stack(kinds)[:, 1:].copy())
            yield name, Batch(
                input_ids=tokens[:, :-1].contiguous(), labels=tokens[:, 1:].contiguous(),
                domain=torch.full((len(rows),), d, dtype=torch.int64), cursor=first,
                loss_mask=(label_kind == MASK_BASE).float(), token_kind=label_kind,
            )


def retrieved_fraction(token_kind: torch.Tensor) -> float:
    """Share of a packed batch's label positions that are retrieved context (boundaries included)."""
    return float((token_kind == MASK_CONTEXT).float().mean()) if token_kind.numel() else 0.0
