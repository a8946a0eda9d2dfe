"""The in-memory batch source: deterministic, resumable, rank-independent."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from services.trainer.data import BatchSource, DataSourceError, InMemoryBatchSource


def test_it_satisfies_the_protocol(source):
    assert isinstance(source(), BatchSource)


def test_batches_have_the_documented_shapes(source):
    b = next(source(batch_size=3, seq_len=16))
    assert b["input_ids"].shape == b["labels"].shape == (3, 16)
    assert b["input_ids"].dtype == torch.long and b["domain"].shape == (3,)
    torch.testing.assert_close(b["input_ids"][:, 1:], b["labels"][:, :-1])  # labels are the next tokens


def test_state_dict_resumes_the_stream_exactly(source):
    a = source()
    next(a)
    state = json.loads(json.dumps(a.state_dict()))  # JSON-serialisable
    expected = [next(a) for _ in range(3)]
    b = source()
    b.load_state_dict(state)
    for e in expected:
        torch.testing.assert_close(next(b)["input_ids"], e["input_ids"])


def test_two_ranks_together_read_the_single_process_batch(source):
    one = next(source(batch_size=4))
    r0 = next(source(batch_size=2, rank=0, world_size=2))
    r1 = next(source(batch_size=2, rank=1, world_size=2))
    torch.testing.assert_close(torch.cat([r0["input_ids"], r1["input_ids"]]), one["input_ids"])


def test_skip_moves_the_cursor_and_weights_steer_domains(source):
    s = source(batch_size=8)
    s.skip(16)
    assert s.cursor == 16
    s.set_weights({"code": 1.0, "prose": 0.0})
    assert set(next(s)["domain"].tolist()) == {0}
    with pytest.raises(DataSourceError, match="unknown domains"):
        s.set_weights({"math": 1.0})


def test_ignore_token_produces_a_loss_mask():
    s = InMemoryBatchSource(np.array([0, 1, 2, 0, 1, 2] * 20), seq_len=6, batch_size=2, ignore_token=0)
    b = next(s)
    torch.testing.assert_close(b["loss_mask"], (b["labels"] != 0).float())
