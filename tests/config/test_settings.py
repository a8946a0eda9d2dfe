"""Configuration: a bad value fails at start-up naming the field."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from helox.runconfig import load_run_config
from shared.config import ConfigError, load_settings

REPO = Path(__file__).resolve().parents[2]


def test_env_overrides_yaml_and_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("settings:\n  topic_prefix: 'yaml.'\n  max_deliveries: 7\n")
    monkeypatch.setenv("HELOX_MAX_DELIVERIES", "9")
    s = load_settings(cfg)
    assert s.topic_prefix == "yaml." and s.max_deliveries == 9


@pytest.mark.parametrize(
    ("env", "value", "field"),
    [
        ("HELOX_RECLAIM_IDLE_MS", "soon", "reclaim_idle_ms"),
        ("HELOX_REDIS_URL", "http://localhost", "redis_url"),
        ("HELOX_LOG_FORMAT", "xml", "log_format"),
        ("HELOX_MAX_DELIVERIES", "0", "max_deliveries"),
    ],
)
def test_invalid_setting_names_the_field(env: str, value: str, field: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(env, value)
    with pytest.raises(ConfigError) as exc:
        load_settings()
    assert field in str(exc.value) and env in str(exc.value)


def test_unknown_setting_is_rejected(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("settings:\n  reclaim_idle: 5\n")
    with pytest.raises(ConfigError, match="reclaim_idle"):
        load_settings(cfg)


def test_service_with_bad_config_exits_2_naming_the_field(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "HELOX_REDIS_URL": "redis://127.0.0.1:1/0", "HELOX_HEARTBEAT_INTERVAL_S": "-1"}
    proc = subprocess.run(
        [sys.executable, "-m", "services.evaluator"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2
    assert "heartbeat_interval_s" in proc.stderr


def test_run_config_errors_name_file_and_field(tmp_path: Path) -> None:
    bad = tmp_path / "run.yaml"
    bad.write_text("name: demo\nstages: [data, bake]\n")
    with pytest.raises(ConfigError) as exc:
        load_run_config(bad)
    assert str(bad) in str(exc.value) and "stages" in str(exc.value)
    bad.write_text("name: demo\nstagez: [data]\n")
    with pytest.raises(ConfigError, match="stagez"):
        load_run_config(bad)


def test_demo_config_is_valid() -> None:
    cfg = load_run_config(REPO / "configs" / "demo.yaml")
    assert cfg.stages[0] == "data"
    assert len(cfg.config_hash()) == 64


def test_the_drill_config_is_valid_and_injects_its_fault() -> None:
    cfg = load_run_config(REPO / "configs" / "drill.yaml")
    assert cfg.stages == ["data", "train"]
    faults = cfg.train["faults"]
    assert (faults["lr_multiply_step"], faults["lr_multiply_factor"]) == (150, 300.0)
    assert cfg.train["checkpoint"]["every"] < cfg.train["faults"]["lr_multiply_step"]  # a checkpoint to roll back to
