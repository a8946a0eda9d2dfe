"""`make test-deploy`: the compose deployment, for real.

Build the image, `compose up -d --scale evaluator=2` (+ the reference Cyrex, + Redis on a host
port), wait for every healthcheck, check that a service refuses the development secrets, submit
a run through the `cli` service, SIGKILL the evaluator container that is judging a checkpoint,
and expect ModelReady, every checkpoint judged exactly once and Cyrex answering; `compose down -v`.
With --s3 the same on the S3 setup instead (deploy/compose.s3.yml and the `objectstore` service,
profile s3, on generated keys): every reference the run published is s3:// in the bucket, and
`helox generate s3://…` in a fresh cli container runs the export fetched from it. The reference
Cyrex reads exports from a local path, so it is not part of that setup.

The stack runs on freshly generated secrets (an ACL file from `deploy/acl.py --from-env`), the
production path: nothing here sets HELOX_ALLOW_DEV_SECRETS.

    python -m tests.deploy.compose_live [--config tests/deploy/compose-demo.yaml] [--s3] [--keep]

Exit 0: passed, or skipped (printed) where Docker cannot run; 1: failed (with the logs of the
service that failed). Not collected by pytest (the regular suite needs no Docker).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import redis

from contracts import TOPICS, CheckpointSaved, EvaluationCompleted, ModelReady, RunFailed, topic_for
from shared.bus.admin import decode_entry

REPO = Path(__file__).resolve().parents[2]
PROJECT = "helox-deploytest"
IMAGE_TAG = "deploytest"
EVALUATORS = 2
SERVICES = ("redis", "data-prep", "trainer", "health-monitor", "evaluator", "exporter", "cyrex")
PROFILES = ("--profile", "cyrex", "--profile", "tools")
FILES = ("-f", str(REPO / "docker-compose.yml"), "-f", str(REPO / "deploy" / "compose.redis-port.yml"))
CPU_TORCH_INDEX = "https://download.pytorch.org/whl/cpu"
PREFIX = "helox."

BUILD_TIMEOUT_S = 900
HEALTHY_TIMEOUT_S = 300
RUN_TIMEOUT_S = 960  # the run config's own timeout_s (900) ends `helox run` first
CYREX_TIMEOUT_S = 180


class DeployTestFailed(Exception):
    """The deployment did not do what it should; the message says what, `service` whose logs to show."""

    def __init__(self, message: str, *services: str) -> None:
        super().__init__(message)
        self.services = services


def log(msg: str) -> None:
    print(f"[test-deploy {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def compose_command() -> list[str] | None:
    """`docker compose` (v2) where it exists, else Debian's `docker-compose` (1.29)."""
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True,
                                                  timeout=30).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def torch_index() -> str:
    """PyTorch's CPU index where it is reachable, else the build's own pip configuration (a machine
    with local wheels and no route to download.pytorch.org); HELOX_TORCH_INDEX_URL overrides."""
    if "HELOX_TORCH_INDEX_URL" in os.environ:
        return os.environ["HELOX_TORCH_INDEX_URL"]
    try:
        urllib.request.urlopen(f"{CPU_TORCH_INDEX}/torch/", timeout=5).close()
        return CPU_TORCH_INDEX
    except OSError:
        return ""


S3_SERVICES = ("redis", "objectstore", "data-prep", "trainer", "health-monitor", "evaluator", "exporter")
S3_FILES = ("-f", str(REPO / "deploy" / "compose.s3.yml"))
S3_PROFILES = ("--profile", "s3", "--profile", "tools")
S3_BUCKET, S3_PREFIX = "helox-deploytest", "artifacts"


class Deployment:
    """One compose project with generated secrets (--s3: the S3 setup, with generated keys too)."""

    def __init__(self, compose: list[str], workdir: Path, *, s3: bool = False) -> None:
        self.s3 = s3
        self.services = S3_SERVICES if s3 else SERVICES
        # One torch/OpenMP thread per process: six Python services share the host's cores (as in
        # tests/e2e); oversubscribed OpenMP threads slow to a crawl on a busy machine.
        override = workdir / "compose.test.yml"
        override.write_text(json.dumps({"services": {name: {"environment": {"OMP_NUM_THREADS": "1"}}
                                                     for name in self.services
                                                     if name not in ("redis", "objectstore")}}))
        files = (*FILES, *S3_FILES) if s3 else FILES
        self.compose = [*compose, "-p", PROJECT, *files, "-f", str(override), *(S3_PROFILES if s3 else PROFILES)]
        self.workdir = workdir
        self.redis_port = free_port()
        acl = _acl_module()
        self.passwords = {user: secrets.token_urlsafe(24) for user in acl.USERS}
        self.signing_key = secrets.token_urlsafe(32)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("HELOX_", "COMPOSE_"))}
        self.env.update({acl.password_env(u): p for u, p in self.passwords.items()})
        acl_file = workdir / "users.acl"
        acl_file.write_text(acl.render(self.passwords))
        acl_file.chmod(0o644)  # the official redis image reads it as uid 999
        workdir.chmod(0o755)
        self.env.update(
            HELOX_SIGNING_KEY=self.signing_key,
            HELOX_REDIS_ACL_FILE=str(acl_file),
            HELOX_REDIS_PORT=str(self.redis_port),
            HELOX_IMAGE_TAG=IMAGE_TAG,
            HELOX_TORCH_INDEX_URL=torch_index(),
        )
        if s3:
            self.env.update(HELOX_S3_BUCKET=S3_BUCKET, HELOX_S3_PREFIX=S3_PREFIX,
                            HELOX_S3_ACCESS_KEY_ID="deploytest", HELOX_S3_SECRET_ACCESS_KEY=secrets.token_urlsafe(24))
        self._admin: redis.Redis | None = None

    def run(self, *args: str, timeout: float, check: bool = True) -> subprocess.CompletedProcess[str]:
        """`compose ARGS`, output captured; DeployTestFailed on a timeout or (check) a failure."""
        try:
            out = subprocess.run([*self.compose, *args], env=self.env, cwd=REPO, capture_output=True, text=True,
                                 timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise DeployTestFailed(f"`compose {' '.join(args[:3])}` did not finish within {timeout:.0f}s") from exc
        if check and out.returncode != 0:
            tail = "\n".join((out.stdout + out.stderr).splitlines()[-40:])
            raise DeployTestFailed(f"`compose {' '.join(args[:3])}` failed (exit {out.returncode}):\n{tail}")
        return out

    def container_ids(self, service: str) -> list[str]:
        return self.run("ps", "-q", service, timeout=60).stdout.split()

    @property
    def admin(self) -> redis.Redis:
        if self._admin is None:
            self._admin = redis.Redis(host="127.0.0.1", port=self.redis_port, username="admin",
                                      password=self.passwords["admin"], socket_timeout=10)
        return self._admin

    def events(self, payload: type, run_id: str) -> list[Any]:
        out = []
        for _id, fields in self.admin.xrange(topic_for(payload).stream(PREFIX)):
            env = decode_entry(fields)
            if env is not None and env.run_id == run_id:
                out.append(env)
        return out

    def show_logs(self, services: tuple[str, ...], lines: int = 60) -> None:
        for service in services:
            out = self.run("logs", "--no-color", "--tail", str(lines), service, timeout=60, check=False)
            print(f"----- docker compose logs --tail {lines} {service} -----\n{out.stdout}{out.stderr}", flush=True)

    def down(self) -> None:
        self.run("down", "-v", "--remove-orphans", "-t", "10", timeout=180, check=False)


def _acl_module() -> Any:
    from .conftest import load_acl_module

    return load_acl_module()


def health(container: str) -> str:
    out = subprocess.run(["docker", "inspect", "-f", "{{.State.Status}} {{if .State.Health}}{{.State.Health.Status}}"
                          "{{else}}none{{end}} {{.Name}}", container], capture_output=True, text=True, timeout=30)
    return out.stdout.strip()


def wait_healthy(dep: Deployment) -> None:
    """Every container with a healthcheck healthy (Cyrex has none: running is enough)."""
    deadline = time.monotonic() + HEALTHY_TIMEOUT_S
    while True:
        states = {}
        for service in dep.services:
            ids = dep.container_ids(service)
            want = EVALUATORS if service == "evaluator" else 1
            if len(ids) != want:
                raise DeployTestFailed(f"{service}: {len(ids)} containers, expected {want}", service)
            for cid in ids:
                states[cid] = (service, health(cid))
        bad = [(s, h) for s, h in states.values() if h.split()[0] not in ("running", "created") or "unhealthy" in h]
        if bad:
            raise DeployTestFailed(f"not running or unhealthy: {bad}", *{s for s, _ in bad})
        waiting = [(s, h) for s, h in states.values() if h.split()[1] not in ("healthy", "none")]
        if not waiting:
            return
        if time.monotonic() > deadline:
            raise DeployTestFailed(f"not healthy within {HEALTHY_TIMEOUT_S}s: {waiting}", *{s for s, _ in waiting})
        time.sleep(2)


def check_dev_secrets_refused(dep: Deployment) -> None:
    """A service given a committed development password exits 2 naming HELOX_ALLOW_DEV_SECRETS."""
    out = dep.run("run", "--rm", "--no-deps", "-T", "-e", "HELOX_REDIS_URL=redis://trainer:helox-dev-trainer@redis:6379/0",
                  "health-monitor", timeout=180, check=False)
    text = out.stdout + out.stderr
    if out.returncode != 2 or "HELOX_ALLOW_DEV_SECRETS=1" not in text:
        raise DeployTestFailed(f"a service started on a development password (exit {out.returncode}):\n{text[-2000:]}")


def busy_evaluator(dep: Deployment, evaluators: dict[str, str]) -> tuple[str, str, bytes] | None:
    """(container id, consumer, entry id) of an evaluator holding a pending checkpoint, if any.
    A consumer is named after its instance, `evaluator-<hostname>-<pid>`, and a container's
    hostname is its short id."""
    stream = TOPICS["train.checkpoint-saved"].stream(PREFIX)
    try:
        pending = dep.admin.xpending_range(stream, "evaluator", min="-", max="+", count=10)
    except redis.ResponseError:  # no group yet
        return None
    for entry in pending:
        name = entry["consumer"].decode()
        for short, cid in evaluators.items():
            if short in name:
                return cid, name, entry["message_id"]
    return None


def checkpoint_of(dep: Deployment, entry_id: bytes) -> str | None:
    """The digest of the checkpoint a checkpoint-saved entry announces."""
    stream = TOPICS["train.checkpoint-saved"].stream(PREFIX)
    for _id, fields in dep.admin.xrange(stream, min=entry_id, max=entry_id):
        env = decode_entry(fields)
        if env is not None:
            return str(env.payload.digest)
    return None


def run_id_of(cli_output: str) -> str | None:
    """The id in `helox run`'s "run <id> requested: ..." line."""
    for line in cli_output.splitlines():
        if line.startswith("run ") and " requested" in line:
            return line.split()[1]
    return None


def submit_and_kill(dep: Deployment, config: Path) -> tuple[str, dict[str, Any]]:
    """Submit CONFIG through the cli service; SIGKILL the evaluator that judges a checkpoint."""
    evaluators = {cid[:12]: cid for cid in dep.container_ids("evaluator")}
    cli_log = dep.workdir / "cli.log"
    mounted = "/tmp/helox-deploy-test.yaml"
    with open(cli_log, "w") as fh:
        cli = subprocess.Popen([*dep.compose, "run", "--rm", "-T", "-e", "COLUMNS=160",
                                "-v", f"{config.resolve()}:{mounted}:ro", "cli", "helox", "run", mounted],
                               env=dep.env, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT)
    killed: dict[str, Any] = {}
    deadline = time.monotonic() + RUN_TIMEOUT_S
    next_look = 0.0
    try:
        while cli.poll() is None:
            if time.monotonic() > deadline:
                raise DeployTestFailed(f"the run did not end within {RUN_TIMEOUT_S}s:\n{_tail(cli_log)}",
                                       "trainer", "evaluator", "exporter")
            # The final checkpoint failing a gate: no export will come (the config exports the final
            # checkpoint), and `helox run` would wait for it until its timeout.
            if time.monotonic() > next_look:
                next_look = time.monotonic() + 5
                run_id = run_id_of(cli_log.read_text())
                final = [e.payload for e in dep.events(EvaluationCompleted, run_id) if e.payload.is_final] if run_id else []
                if final and not final[-1].gates_passed:
                    failed = [g.name for g in final[-1].gates if not g.passed]
                    raise DeployTestFailed(f"the final checkpoint failed its gates, so nothing is exported: {failed} "
                                           f"({final[-1].verdict}): {final[-1].model_dump_json()[:3000]}", "evaluator")
            if not killed:
                busy = busy_evaluator(dep, evaluators)
                if busy:
                    cid, consumer, entry_id = busy
                    subprocess.run(["docker", "kill", "-s", "KILL", cid], capture_output=True, timeout=30, check=True)
                    killed = {"container": cid[:12], "consumer": consumer, "checkpoint": checkpoint_of(dep, entry_id)}
                    log(f"SIGKILLed evaluator {cid[:12]} ({consumer}) while it judged checkpoint "
                        f"{str(killed['checkpoint'])[:12]}")
            time.sleep(0.1 if not killed else 1.0)
    finally:
        if cli.poll() is None:
            cli.kill()
    text = cli_log.read_text()
    print(text, flush=True)
    if cli.returncode != 0 or "succeeded" not in text:
        raise DeployTestFailed(f"`helox run` through the cli service failed (exit {cli.returncode})",
                               "data-prep", "trainer", "evaluator", "exporter")
    run_id = run_id_of(text)
    if not run_id:
        raise DeployTestFailed("no run id in the cli's output")
    if not killed:
        raise DeployTestFailed("no evaluator was ever seen judging a checkpoint: nothing was killed", "evaluator")
    return run_id, killed


def check_run(dep: Deployment, run_id: str, killed: dict[str, Any]) -> ModelReady:
    if dep.events(RunFailed, run_id):
        raise DeployTestFailed(f"RunFailed for {run_id}")
    ready = dep.events(ModelReady, run_id)
    if len(ready) != 1:
        raise DeployTestFailed(f"{len(ready)} ModelReady events for {run_id}, expected 1", "exporter")
    saved = sorted(e.payload.digest for e in dep.events(CheckpointSaved, run_id))
    evals = dep.events(EvaluationCompleted, run_id)
    judged = Counter(e.payload.checkpoint_digest for e in evals)
    if not saved or sorted(judged.elements()) != saved:
        raise DeployTestFailed(f"checkpoints {saved} judged {dict(judged)}: every checkpoint must be judged exactly once",
                               "evaluator")
    if killed["checkpoint"] not in judged:
        raise DeployTestFailed(f"the checkpoint the killed evaluator held ({killed['checkpoint']}) was never judged",
                               "evaluator")
    by = Counter(e.producer.instance for e in evals)
    rescuer = next(e.producer.instance for e in evals if e.payload.checkpoint_digest == killed["checkpoint"])
    log(f"{len(saved)} checkpoints, each judged exactly once (by instance: {dict(by)}); the one the killed "
        f"evaluator held was judged by {rescuer}")
    return ready[0].payload


def check_cyrex(dep: Deployment, ready: ModelReady) -> None:
    """The reference Cyrex service loaded the model and answered; an outside Cyrex, on the published
    port with its own ACL user, may read the stream and may not write to it."""
    deadline = time.monotonic() + CYREX_TIMEOUT_S
    pattern = f'"model_id": "{ready.model_id}"'
    while True:
        out = dep.run("logs", "--no-color", "cyrex", timeout=60, check=False).stdout
        lines = [line for line in out.splitlines() if pattern in line]
        if lines:
            if '"status": "ok"' not in lines[-1]:
                raise DeployTestFailed(f"Cyrex did not load the model: {lines[-1]}", "cyrex")
            log(f"cyrex: {lines[-1].split('|', 1)[-1].strip()[:300]}")
            break
        if time.monotonic() > deadline:
            raise DeployTestFailed(f"Cyrex did not report {ready.model_id} within {CYREX_TIMEOUT_S}s", "cyrex")
        time.sleep(2)
    outside = redis.Redis(host="127.0.0.1", port=dep.redis_port, username="cyrex", password=dep.passwords["cyrex"],
                          socket_timeout=10)
    stream = TOPICS["export.model-ready"].stream(PREFIX)
    if not outside.xrange(stream):
        raise DeployTestFailed("the cyrex user reads nothing on the published port")
    try:
        outside.xadd(stream, {"x": "y"})
    except redis.exceptions.NoPermissionError:
        pass
    else:
        raise DeployTestFailed("the cyrex user could XADD to export.model-ready")
    outside.close()


def check_s3(dep: Deployment, ready: ModelReady, run_id: str) -> None:
    """Every reference the run published lies in the bucket, none on a local path; a fresh cli
    container (an empty cache) runs the export straight from the bucket, verified."""
    root = f"s3://{S3_BUCKET}/{S3_PREFIX}/"
    uris = [r.uri for r in (ready.manifest, *ready.formats.values())]
    uris += [e.payload.checkpoint.uri for e in dep.events(CheckpointSaved, run_id)]
    outside = [u for u in uris if not u.startswith(root)]
    if outside:
        raise DeployTestFailed(f"references outside {root}: {outside}", "trainer", "exporter")
    out = dep.run("run", "--rm", "-T", "cli", "helox", "generate", ready.manifest.uri, "--prompt", "def ",
                  "--max-tokens", "16", timeout=300, check=False)
    if out.returncode != 0 or not out.stdout.startswith("def "):
        raise DeployTestFailed(f"`helox generate {ready.manifest.uri}` in the cli container failed "
                               f"(exit {out.returncode}):\n{(out.stdout + out.stderr)[-2000:]}", "objectstore")
    log(f"{len(uris)} references, all under {root}; helox generate from the bucket: {out.stdout.strip()[:80]!r}")


def _tail(path: Path, lines: int = 30) -> str:
    return "\n".join(path.read_text().splitlines()[-lines:]) if path.exists() else ""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.deploy.compose_live", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", type=Path, default=REPO / "tests" / "deploy" / "compose-demo.yaml")
    ap.add_argument("--keep", action="store_true", help="leave the stack running (and its volumes)")
    ap.add_argument("--s3", action="store_true", help="the S3 setup: deploy/compose.s3.yml + the objectstore service")
    args = ap.parse_args(argv)

    compose = compose_command()
    if compose is None:
        print("SKIPPED test-deploy: neither `docker compose` nor `docker-compose` is installed", flush=True)
        return 0
    timings: dict[str, float] = {}
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="helox-deploy-") as tmp:
        dep = Deployment(compose, Path(tmp), s3=args.s3)
        dep.down()  # a previous run's leftovers
        failed: DeployTestFailed | None = None
        try:
            t = time.monotonic()
            log(f"building the image ({' '.join(compose)}; torch from {dep.env['HELOX_TORCH_INDEX_URL'] or 'pip.conf'})")
            dep.run("build", "data-prep", timeout=BUILD_TIMEOUT_S)
            timings["build"] = time.monotonic() - t

            t = time.monotonic()
            extra = "objectstore, artifacts in S3" if args.s3 else "cyrex"
            log(f"up -d --scale evaluator={EVALUATORS} (+ {extra}; redis on 127.0.0.1:{dep.redis_port})")
            dep.run("up", "-d", "--no-build", "--scale", f"evaluator={EVALUATORS}", *dep.services, timeout=300)
            wait_healthy(dep)
            timings["up"] = time.monotonic() - t
            log(f"every healthcheck passes ({timings['up']:.0f}s)")

            t = time.monotonic()
            check_dev_secrets_refused(dep)
            timings["dev-secrets"] = time.monotonic() - t
            log("a service given a development password refuses to start")

            t = time.monotonic()
            log(f"submitting {args.config.relative_to(REPO) if args.config.is_relative_to(REPO) else args.config} "
                "through the cli service")
            run_id, killed = submit_and_kill(dep, args.config)
            ready = check_run(dep, run_id, killed)
            timings["run"] = time.monotonic() - t

            t = time.monotonic()
            if args.s3:
                check_s3(dep, ready, run_id)
                timings["s3"] = time.monotonic() - t
            else:
                check_cyrex(dep, ready)
                timings["cyrex"] = time.monotonic() - t
        except DeployTestFailed as exc:
            failed = exc
            print(f"FAILED test-deploy: {exc}", flush=True)
            print(dep.run("ps", timeout=60, check=False).stdout, flush=True)
            dep.show_logs(exc.services or dep.services)
        except Exception:
            dep.show_logs(dep.services, lines=30)
            raise
        finally:
            if not args.keep:
                t = time.monotonic()
                dep.down()
                timings["down"] = time.monotonic() - t
    timings["total"] = time.monotonic() - started
    print("test-deploy timings: " + json.dumps({k: round(v) for k, v in timings.items()}), flush=True)
    if failed:
        return 1
    log("PASSED" + (" (S3 setup)" if args.s3 else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
