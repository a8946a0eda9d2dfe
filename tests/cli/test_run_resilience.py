"""`helox run` and `helox cancel` against a real Redis and a real data-prep process: a run
survives a Redis restart (same data, AOF) and exits 0; a refused request exits 2 naming the
field; a cancelled run stops its `helox run`."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import redis
import yaml

from contracts import DataPrepProgress, DatasetReady, RunCancelled, RunRequested
from shared.redis_server import RedisServer
from tests.bus.helpers import read_all, stop, wait_for, wait_for_group
from tests.data_prep.conftest import write_corpus

HELOX = [sys.executable, "-m", "helox.cli"]


def _config(tmp: Path, name: str, **sections: object) -> Path:
    corpus = tmp / "corpus"
    cfg = {
        "name": name, "stages": ["data"], "timeout_s": 240,
        "corpus": {"sources": [{"path": str(corpus / "prose"), "domain": "prose"},
                               {"path": str(corpus / "code"), "domain": "code"}], "roots": [str(corpus)]},
        "data": {"filters": {"min_doc_chars": 32}, "tokenizer": {"vocab_size": 400},
                 "sharding": {"shard_tokens": 4000, "val_fraction": 0.1, "workers": 1}},
        **sections,
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _data_prep(env: dict[str, str], cwd: Path) -> subprocess.Popen[bytes]:
    log = open(cwd / "data-prep.log", "ab")  # noqa: SIM115
    return subprocess.Popen([sys.executable, "-m", "services.data_prep"],
                            env={**env, "HELOX_INSTANCE": "data-prep-1", "OMP_NUM_THREADS": "1"},
                            cwd=cwd, stdout=log, stderr=subprocess.STDOUT)


def _helox_run(config: Path, env: dict[str, str], cwd: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([*HELOX, "run", str(config)], env={**env, "COLUMNS": "200"}, cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_helox_run_exits_0_across_a_redis_restart(
    redis_server: RedisServer, subprocess_env: dict[str, str], tmp_path: Path
) -> None:
    write_corpus(tmp_path, n_prose=200, n_code=150)
    client = redis.Redis.from_url(redis_server.url)
    prep = _data_prep(subprocess_env, tmp_path)
    run = None
    try:
        wait_for_group(client, "helox.runs.requested", "data-prep", timeout=60)
        run = _helox_run(_config(tmp_path, "restart"), subprocess_env, tmp_path)
        wait_for(lambda: read_all(client, DataPrepProgress), timeout=60, what="data prep under way")
        redis_server.restart(down_for=3.0)  # same port, same data (AOF)
        out, err = run.communicate(timeout=240)
        client = redis.Redis.from_url(redis_server.url)
        assert run.returncode == 0, f"stdout:\n{out}\nstderr:\n{err}"
        assert "lost Redis" in err and "reconnected to Redis" in err
        assert "Traceback" not in err and "succeeded" in out
        (ready,) = read_all(client, DatasetReady)
        (request,) = read_all(client, RunRequested)
        assert ready.run_id == request.run_id
    finally:
        if run is not None and run.poll() is None:
            run.kill()
        assert stop(prep) == 0


def test_a_request_refused_by_data_prep_exits_2_naming_the_field(
    redis_server: RedisServer, subprocess_env: dict[str, str], tmp_path: Path
) -> None:
    write_corpus(tmp_path)
    (tmp_path / "allowed").mkdir()
    client = redis.Redis.from_url(redis_server.url)
    prep = _data_prep({**subprocess_env, "HELOX_CORPUS_ROOTS": str(tmp_path / "allowed")}, tmp_path)
    try:
        wait_for_group(client, "helox.runs.requested", "data-prep", timeout=60)
        run = _helox_run(_config(tmp_path, "widened"), subprocess_env, tmp_path)
        out, err = run.communicate(timeout=120)
        assert run.returncode == 2, f"stdout:\n{out}\nstderr:\n{err}"
        assert "FAILED in request" in out and "corpus.roots.0" in out and "Traceback" not in err
        assert not read_all(client, DataPrepProgress)
    finally:
        assert stop(prep) == 0


def test_an_unknown_model_preset_exits_2_before_anything_is_published(
    redis_url: str, subprocess_env: dict[str, str], tmp_path: Path
) -> None:
    config = _config(tmp_path, "preset", train={"model": "gpt-17"})
    run = _helox_run(config, subprocess_env, tmp_path)
    out, err = run.communicate(timeout=60)
    assert run.returncode == 2, f"stdout:\n{out}\nstderr:\n{err}"
    assert "train.model" in err and "gpt-17" in err and "Traceback" not in err
    assert not redis.Redis.from_url(redis_url).exists("helox.runs.requested")


def test_helox_cancel_stops_an_abandoned_runs_helox_run(
    redis_url: str, subprocess_env: dict[str, str], tmp_path: Path
) -> None:
    client = redis.Redis.from_url(redis_url)
    # A data-prep group that nobody reads: the run waits, as one whose service is stuck would.
    client.xgroup_create("helox.runs.requested", "data-prep", id="$", mkstream=True)
    write_corpus(tmp_path)
    run = _helox_run(_config(tmp_path, "stuck"), subprocess_env, tmp_path)
    try:
        (request,) = wait_for(lambda: read_all(client, RunRequested), timeout=60, what="the request")
        time.sleep(0.5)
        cancel = subprocess.run([*HELOX, "cancel", request.run_id or "", "--reason", "timed out"], env=subprocess_env,
                                cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert cancel.returncode == 0, cancel.stderr
        (cancelled,) = read_all(client, RunCancelled)
        assert cancelled.run_id == request.run_id and cancelled.payload.reason == "timed out"
        out, err = run.communicate(timeout=60)
        assert run.returncode == 1, f"stdout:\n{out}\nstderr:\n{err}"
        assert "cancelled by" in out and "timed out" in out
    finally:
        if run.poll() is None:
            run.kill()
