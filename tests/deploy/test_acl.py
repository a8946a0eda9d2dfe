"""The generated Redis ACL file against a real Redis >= 7: each service user can do what
contracts/services.py says and nothing else; TLS (rediss://) with a user works end to end."""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import shutil
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from contracts import HealthAlert, TrainingMetrics, decode
from contracts.events import AlertEvidence
from contracts.services import CLIENTS, PARTICIPANTS, SERVICES
from contracts.topics import DEFAULT_PREFIX, TOPICS
from shared.bus import Bus
from shared.bus.idempotency import Idempotency
from shared.bus.wire import body_of
from shared.config import HeloxSettings
from shared.redis_server import RedisServer

from .conftest import REPO

ACL_FILE = REPO / "deploy" / "redis" / "users.acl"


def stream(key: str) -> str:
    return f"{DEFAULT_PREFIX}{key}"


@pytest.fixture(scope="module")
def acl_server(tmp_path_factory: pytest.TempPathFactory, redis7: str, acl: ModuleType) -> Iterator[RedisServer]:
    """One Redis 7 with the committed users.acl (module-scoped: the tests only read ACLs)."""
    tmp = tmp_path_factory.mktemp("acl-redis")
    aclfile = tmp / "users.acl"
    shutil.copy(ACL_FILE, aclfile)
    server = RedisServer(
        tmp / "data", aclfile=aclfile, username="admin", password=acl.dev_password("admin"), executable=redis7
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()


def client(server: RedisServer, user: str, acl: ModuleType) -> redis.Redis:
    return redis.Redis(host="127.0.0.1", port=server.port, username=user, password=acl.dev_password(user), socket_timeout=5)


@pytest.fixture
def admin(acl_server: RedisServer, acl: ModuleType) -> Iterator[redis.Redis]:
    r = client(acl_server, "admin", acl)
    yield r
    r.close()


def dryrun(admin: redis.Redis, user: str, *command: str) -> bool:
    """ACL DRYRUN: would `user` be allowed to run `command`?"""
    reply = admin.execute_command("ACL", "DRYRUN", user, *command)
    return reply in (b"OK", "OK")


def test_acl_file_is_fresh(acl: ModuleType) -> None:
    assert ACL_FILE.read_text() == acl.render(), (
        "deploy/redis/users.acl is stale: regenerate it with `python deploy/acl.py`"
    )
    assert acl.main(["--check"]) == 0


def test_every_service_and_client_has_a_user(acl: ModuleType) -> None:
    names = [u.name for u in acl.acl_users()]
    assert names == ["default", "admin", *SERVICES, *CLIENTS]
    assert acl.password_env("data-prep") == "HELOX_DATA_PREP_REDIS_PASSWORD"


def test_trainer_writes_its_streams_and_only_reads_what_it_consumes(
    acl_server: RedisServer, acl: ModuleType, admin: redis.Redis
) -> None:
    trainer = client(acl_server, "trainer", acl)
    try:
        assert trainer.xadd(stream("train.metrics"), {"f": "v"}, maxlen=100_000, approximate=True)
        with pytest.raises(redis.exceptions.NoPermissionError):
            trainer.xadd(stream("eval.completed"), {"f": "v"})

        alerts = stream("health.alerts")
        trainer.xgroup_create(alerts, "trainer", id="0", mkstream=True)
        admin.xadd(alerts, {"f": "alert"})
        got = trainer.xreadgroup("trainer", "trainer-1", {alerts: ">"}, count=10)
        assert got and got[0][1][0][1] == {b"f": b"alert"}
        entry_id = got[0][1][0][0]
        assert trainer.xautoclaim(alerts, "trainer", "trainer-2", min_idle_time=0, count=10)
        assert trainer.xack(alerts, "trainer", entry_id) == 1
        with pytest.raises(redis.exceptions.NoPermissionError):
            trainer.xadd(alerts, {"f": "forged"})
        with pytest.raises(redis.exceptions.NoPermissionError):
            trainer.xtrim(alerts, maxlen=0)
        with pytest.raises(redis.exceptions.NoPermissionError):
            trainer.xgroup_destroy(alerts, "trainer")
        # Nothing outside its own streams and keys.
        with pytest.raises(redis.exceptions.NoPermissionError):
            trainer.xrange(stream("export.model-ready"))
        with pytest.raises(redis.exceptions.NoPermissionError):
            trainer.get("helox:idem:evaluator:x")
        with pytest.raises(redis.exceptions.NoPermissionError):
            trainer.flushall()
        with pytest.raises(redis.exceptions.NoPermissionError):
            trainer.keys("*")
    finally:
        trainer.close()


@pytest.mark.parametrize("name", list(PARTICIPANTS))
def test_permissions_follow_contracts(name: str, admin: redis.Redis) -> None:
    """For every user and every stream: XADD iff it publishes (or replays) there, group
    commands iff it consumes, plain reads iff it may read. Checked with ACL DRYRUN."""
    p = PARTICIPANTS[name]
    wrong = []
    for key in TOPICS:
        s = stream(key)
        expect = {
            "xadd": key in p.publishes or key in p.replays,
            "xrange": key in p.readable(),
            "xreadgroup": key in p.consumes,
            "xack": key in p.consumes,
            "xautoclaim": key in p.consumes,
            "xgroup-create": key in p.consumes,
            "xdel": key in p.deletes,
            "exists": key in p.readable(),
            "xtrim": False,
            "del": False,
        }
        actual = {
            "xadd": dryrun(admin, name, "XADD", s, "MAXLEN", "~", "1000", "*", "f", "v"),
            "xrange": dryrun(admin, name, "XRANGE", s, "-", "+", "COUNT", "1"),
            "xreadgroup": dryrun(admin, name, "XREADGROUP", "GROUP", name, "c", "STREAMS", s, ">"),
            "xack": dryrun(admin, name, "XACK", s, name, "0-1"),
            "xautoclaim": dryrun(admin, name, "XAUTOCLAIM", s, name, "c", "1000", "0-0"),
            "xgroup-create": dryrun(admin, name, "XGROUP", "CREATE", s, name, "0", "MKSTREAM"),
            "xdel": dryrun(admin, name, "XDEL", s, "0-1"),
            "exists": dryrun(admin, name, "EXISTS", s),
            "xtrim": dryrun(admin, name, "XTRIM", s, "MAXLEN", "0"),
            "del": dryrun(admin, name, "DEL", s),
        }
        wrong += [f"{cmd} {s}: expected {'allowed' if expect[cmd] else 'denied'}" for cmd in expect if expect[cmd] != actual[cmd]]
    # Idempotency and outbox markers: a service's own, nobody else's.
    for other in SERVICES:
        for kind in ("idem", "outbox"):
            key = f"helox:{kind}:{other}:k"
            allowed = other == name
            for cmd in (("SET", key, "1", "EX", "60"), ("GET", key), ("EXISTS", key), ("DEL", key)):
                if dryrun(admin, name, *cmd) != allowed:
                    wrong.append(f"{cmd[0]} {key}: expected {'allowed' if allowed else 'denied'}")
    assert dryrun(admin, name, "PING")
    assert dryrun(admin, name, "CLIENT", "SETNAME", "x")
    for cmd in (("CLIENT", "KILL", "ID", "1"), ("CLIENT", "LIST"), ("CONFIG", "GET", "*"), ("FLUSHALL",), ("KEYS", "*")):
        if dryrun(admin, name, *cmd):
            wrong.append(f"{' '.join(cmd)}: expected denied")
    assert not wrong, f"user {name}:\n" + "\n".join(wrong)


def test_default_user_is_off(acl_server: RedisServer) -> None:
    no_retry = {"socket_timeout": 5, "retry": Retry(NoBackoff(), 0)}
    for creds in ({}, {"username": "default", "password": ""}, {"username": "trainer", "password": "nope"}):
        r = redis.Redis(host="127.0.0.1", port=acl_server.port, **creds, **no_retry)
        try:
            with pytest.raises(redis.exceptions.AuthenticationError):
                r.ping()
        finally:
            r.close()


async def test_services_run_on_the_bus_with_their_own_users(
    acl_server: RedisServer, acl: ModuleType, admin: redis.Redis, tmp_path: Path
) -> None:
    """A real Bus per service user (FastStream's connect sequence, consumer groups, XAUTOCLAIM
    reclaimers, idempotency MULTI/EXEC): the round trip works and Redis denied nothing."""
    admin.execute_command("ACL", "LOG", "RESET")

    def settings(user: str) -> HeloxSettings:
        url = f"redis://{user}:{acl.dev_password(user)}@127.0.0.1:{acl_server.port}/0"
        return HeloxSettings(
            redis_url=url, artifacts=tmp_path / "a", state_dir=tmp_path / "s",
            polling_interval_ms=50, reclaim_idle_ms=500,
        )

    trainer = Bus(settings("trainer"), "trainer", instance="trainer-acl")
    monitor = Bus(settings("health-monitor"), "health-monitor", instance="hm-acl")
    got: asyncio.Queue[HealthAlert] = asyncio.Queue()
    metrics_seen: asyncio.Queue[TrainingMetrics] = asyncio.Queue()

    async def on_alert(env, delivery) -> None:  # type: ignore[no-untyped-def]
        await got.put(env.payload)

    async def on_metrics(env, delivery) -> None:  # type: ignore[no-untyped-def]
        await metrics_seen.put(env.payload)

    trainer.subscribe(HealthAlert, on_alert)
    monitor.subscribe(TrainingMetrics, on_metrics)
    await trainer.start()
    await monitor.start()
    try:
        await trainer.publish(
            TrainingMetrics(step=1, tokens_seen=10, loss=float("nan"), lr=1e-3, grad_norm=1.0, seq_len=8, batch_size=2),
            run_id="r-acl",
        )
        seen = await asyncio.wait_for(metrics_seen.get(), 10)
        assert seen.step == 1
        await monitor.publish(
            HealthAlert(
                incident_id="i1", kind="non_finite", severity="critical", step_start=1, step_end=1,
                evidence=AlertEvidence(statistic="loss", value=float("nan"), threshold=0.0),
                recommended_action="rollback", message="NaN loss",
            ),
            run_id="r-acl",
        )
        alert = await asyncio.wait_for(got.get(), 10)
        assert alert.incident_id == "i1"

        idem = Idempotency(trainer.redis, "trainer")
        pipe = idem.transaction()
        pipe.xadd(stream("train.actions"), {"f": "v"})
        await idem.commit("evt-1", pipe=pipe)
        assert await idem.seen("evt-1")
        with pytest.raises(redis.exceptions.NoPermissionError):
            await Idempotency(trainer.redis, "evaluator").seen("evt-1")
        # The trainer cannot forge an alert.
        with pytest.raises(redis.exceptions.NoPermissionError):
            await trainer.publish(alert)
        await asyncio.sleep(0.7)  # let the reclaimers (XAUTOCLAIM) run at least once
    finally:
        await trainer.stop()
        await monitor.stop()
    denied = [
        (e[b"username"], e[b"object"], e[b"reason"])
        for e in (dict(zip(entry[::2], entry[1::2], strict=True)) if isinstance(entry, list) else entry
                  for entry in admin.execute_command("ACL", "LOG"))
        if e[b"object"] not in (b"helox:idem:evaluator:evt-1", b"helox.health.alerts")
    ]
    assert not denied, f"Redis denied commands a service needs: {denied}"


# --- TLS --------------------------------------------------------------------------------


def _make_tls(directory: Path) -> dict[str, str]:
    """A throwaway CA and a server certificate for 127.0.0.1/localhost, signed by it."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.UTC)

    def write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
        path.write_bytes(
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        )

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "helox test CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, key_cert_sign=True, crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    paths = {"ca": directory / "ca.pem", "cert": directory / "server.pem", "key": directory / "server.key"}
    paths["ca"].write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    paths["cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    write_key(key, paths["key"])
    return {k: str(v) for k, v in paths.items()}


@pytest.fixture
def tls_server(tmp_path: Path, redis7: str, acl: ModuleType) -> Iterator[tuple[RedisServer, dict[str, str]]]:
    certs = _make_tls(tmp_path)
    aclfile = tmp_path / "users.acl"
    shutil.copy(ACL_FILE, aclfile)
    server = RedisServer(
        tmp_path / "data", aclfile=aclfile, username="admin", password=acl.dev_password("admin"),
        tls=certs, executable=redis7,
    )
    server.start()
    try:
        yield server, certs
    finally:
        server.stop()


async def test_rediss_url_with_user_and_password(tls_server: tuple[RedisServer, dict[str, str]], acl: ModuleType, tmp_path: Path) -> None:
    server, certs = tls_server
    url = f"rediss://trainer:{acl.dev_password('trainer')}@127.0.0.1:{server.port}/0"
    metrics = stream("train.metrics")

    # redis-py directly, verifying the server against the throwaway CA.
    r = redis.Redis.from_url(url, ssl_ca_certs=certs["ca"], socket_timeout=5)
    try:
        entry_id = r.xadd(metrics, {"f": "tls"})
        assert r.xread({metrics: "0-0"})[0][1][0] == (entry_id, {b"f": b"tls"})
        with pytest.raises(redis.exceptions.NoPermissionError):
            r.xadd(stream("eval.completed"), {"f": "v"})
    finally:
        r.close()
    # Without the CA the certificate is not trusted.
    untrusted = redis.Redis.from_url(url, socket_timeout=5, retry=Retry(NoBackoff(), 0))
    try:
        with pytest.raises(redis.exceptions.ConnectionError, match="certificate verify failed"):
            untrusted.ping()
    finally:
        untrusted.close()

    # The project's bus: the CA travels in the URL's query (redis-py passes `ssl_ca_certs`
    # through to the SSL connection), so HELOX_REDIS_URL alone configures TLS.
    settings = HeloxSettings(
        redis_url=f"{url}?ssl_ca_certs={certs['ca']}", artifacts=tmp_path / "a", state_dir=tmp_path / "s"
    )
    bus = Bus(settings, "trainer", instance="trainer-tls")
    await bus.connect()
    try:
        sent = await bus.publish(
            TrainingMetrics(step=7, tokens_seen=70, loss=float("inf"), lr=1e-3, grad_norm=2.0, seq_len=8, batch_size=2),
            run_id="r-tls",
        )
        rows = await bus.redis.xrevrange(metrics, count=1)
        back = decode(body_of(rows[0][1]), TrainingMetrics)
        assert back.event_id == sent.event_id and back.payload.step == 7 and back.payload.loss == float("inf")
    finally:
        await bus.stop()
