"""Every invalid value of a run config fails at the request (`load_run_config`), naming the
section and the field, whichever section owns it."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from helox.runconfig import load_run_config
from shared.config import ConfigError

BAD_VALUES = [
    ({"timeout_s": -1}, "timeout_s"),
    ({"corpus": {"sources": [{"path": "x", "domain": "bad domain!"}], "roots": ["."]}}, "corpus.sources.0.domain"),
    ({"data": {"minhash": {"threshold": 1.5}}}, "minhash.threshold"),
    ({"train": {"optim": {"lr": -0.1}}}, "train.optim.lr"),
    ({"train": {"model_overrides": {"n_layer": 0}}}, "n_layer"),
    ({"train": {"optim": {"lrr": 0.1}}}, "train.optim.lrr"),
    ({"eval": {"confidence": 2.0}}, "eval.confidence"),
    ({"health": {"loss_spike": {"z_threshold": 0}}}, "health.loss_spike.z_threshold"),
    ({"health": {"loss_spikes": {}}}, "health.loss_spikes"),
    ({"export": {"formats": ["zip"]}}, "export.formats.0"),
]


@pytest.mark.parametrize(("fields", "named"), BAD_VALUES, ids=[n for _, n in BAD_VALUES])
def test_an_invalid_value_fails_at_the_request_naming_its_field(tmp_path: Path, fields: dict, named: str) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"name": "bad", **fields}))
    with pytest.raises(ConfigError) as exc:
        load_run_config(path)
    assert str(path) in str(exc.value) and named in str(exc.value)


def test_the_health_section_travels_as_written_and_the_others_normalised(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"name": "ok", "health": {"loss_spike": {"z_threshold": 4}},
                                    "train": {"max_steps": 5}}))
    cfg = load_run_config(path).pipeline_config()
    assert cfg["health"] == {"loss_spike": {"z_threshold": 4}}  # laid over the deployment's by the monitor
    assert cfg["train"]["optim"]["lr"] == 3e-4 and cfg["train"]["max_steps"] == 5
