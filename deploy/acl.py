#!/usr/bin/env python3
"""Generate the Redis ACL file (deploy/redis/users.acl) from contracts.services.

The per-service topic sets live in one place, `contracts/services.py`; the AsyncAPI
document and this ACL file are both generated from it, so they cannot drift (a test
fails when the committed users.acl is stale).

    python deploy/acl.py                 # rewrite deploy/redis/users.acl (development passwords)
    python deploy/acl.py --check         # exit 1 if the committed file is stale
    python deploy/acl.py --from-env -o /secure/users.acl
                                         # real passwords from HELOX_<USER>_REDIS_PASSWORD

Per user (Redis >= 7.0 ACL syntax):
- `~helox.<topic>` (read+write) on the streams it publishes, with XADD;
- `%R~helox.<topic>` (read-only) on the streams it consumes or may read: XRANGE,
  XREVRANGE, XREAD, XPENDING, XINFO, XLEN, EXISTS;
- a selector `(~helox.<consumed>... +xreadgroup +xack ...)` for the consumer-group
  commands on the streams it consumes (Redis counts XACK, XCLAIM, XAUTOCLAIM and XGROUP
  CREATE as writes): those streams are writable *only* through these commands, so a
  consumer can never XADD to them;
- for the CLI, a selector `(~helox.<topic>... +xadd)` on the streams a dead letter can
  come from, so that `dlq replay` can put it back where it came from, and
  `(~helox.dlq +xdel)` to remove it from the dead-letter stream;
- a selector `(~helox:idem:<service>:* ~helox:outbox:<service>:* +get +set ...)` for its
  idempotency and outbox markers (GET/SET/EXISTS/DEL/EXPIRE, MULTI/EXEC): a selector, so
  that DEL never applies to a stream;
- the connection handshake: `+@connection -@admin -@dangerous` (AUTH, HELLO, CLIENT
  SETNAME/SETINFO/ID/INFO, SELECT, PING, ECHO, RESET; not CLIENT KILL/LIST/PAUSE).
`admin` has everything; `default` is off. Passwords are stored as SHA-256 (`#<hex>`).

Redis ACL files cannot hold comments, so the "generated, do not edit" note lives in
deploy/redis/README.md.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: make `contracts` importable
    sys.path.insert(0, str(REPO))

from contracts.services import PARTICIPANTS, Participant  # noqa: E402
from contracts.topics import DEFAULT_PREFIX, TOPICS  # noqa: E402

ACL_FILE = REPO / "deploy" / "redis" / "users.acl"
ADMIN = "admin"
USERS = (ADMIN, *PARTICIPANTS)
"""Every Redis user in the file besides `default`."""

CONNECT = ("+@connection", "-@admin", "-@dangerous")
"""The connection handshake redis-py/FastStream send: AUTH, HELLO, CLIENT SETNAME,
CLIENT SETINFO (Redis >= 7.2 only: named by category so that one file loads on 7.0 and
7.2), SELECT, PING, ECHO, RESET. `-@admin -@dangerous` takes CLIENT KILL/LIST/PAUSE/
UNBLOCK/NO-EVICT back out."""
MARKERS = ("+get", "+set", "+exists", "+del", "+expire", "+multi", "+exec", "+discard")
"""Idempotency and outbox markers (MULTI/EXEC: a marker is written atomically with its effect)."""
STREAM_READ = (
    "+exists",
    "+xrange",
    "+xrevrange",
    "+xread",
    "+xlen",
    "+xinfo|stream",
    "+xinfo|groups",
    "+xinfo|consumers",
    "+xpending",
)
STREAM_WRITE = ("+xadd",)
GROUP_WRITE = ("+xgroup|create", "+xgroup|createconsumer", "+xack", "+xclaim", "+xautoclaim", "+xreadgroup", "+xpending")
"""Consumer-group commands, granted only on the streams a participant consumes. Redis
classifies XACK/XCLAIM/XAUTOCLAIM/XGROUP CREATE as writes, and XREADGROUP as a read: were
XREADGROUP allowed wherever a user may read, it could read as another service's group
(ACLs cannot tell groups apart) and take that group's entries."""


def password_env(user: str) -> str:
    """The environment variable holding a user's password, e.g. HELOX_DATA_PREP_REDIS_PASSWORD."""
    return f"HELOX_{user.upper().replace('-', '_')}_REDIS_PASSWORD"


def dev_password(user: str) -> str:
    """The development default password of a user (committed, documented as such)."""
    return f"helox-dev-{user}"


def dev_passwords() -> dict[str, str]:
    return {u: dev_password(u) for u in USERS}


def env_passwords(environ: Mapping[str, str] | None = None, *, allow_defaults: bool = False) -> dict[str, str]:
    """Passwords from HELOX_<USER>_REDIS_PASSWORD; a missing one is an error unless allow_defaults."""
    environ = os.environ if environ is None else environ
    out: dict[str, str] = {}
    missing = []
    for user in USERS:
        value = environ.get(password_env(user))
        if value:
            out[user] = value
        elif allow_defaults:
            out[user] = dev_password(user)
        else:
            missing.append(password_env(user))
    if missing:
        raise SystemExit(f"missing password environment variables: {', '.join(missing)}")
    return out


@dataclass(frozen=True)
class AclUser:
    name: str
    rules: tuple[str, ...]

    def line(self, password: str | None) -> str:
        secret = ("on", f"#{hashlib.sha256(password.encode()).hexdigest()}") if password is not None else ("off", "resetpass")
        return " ".join(("user", self.name, *secret, *self.rules))


def _ordered(keys: set[str]) -> list[str]:
    return [k for k in TOPICS if k in keys]


def participant_rules(p: Participant, prefix: str = DEFAULT_PREFIX) -> tuple[str, ...]:
    """The ACL rules of one participant (without `user`, on/off and password)."""
    writes = _ordered(set(p.publishes))
    read_only = _ordered((set(p.consumes) | set(p.reads)) - set(p.publishes))
    rules: list[str] = ["resetkeys", "resetchannels", "-@all", *CONNECT, *STREAM_READ]
    if writes:
        rules += STREAM_WRITE
    rules += [f"~{prefix}{k}" for k in writes]
    rules += [f"%R~{prefix}{k}" for k in read_only]
    if p.key_patterns:
        rules.append("(" + " ".join([*(f"~{pattern}" for pattern in p.key_patterns), *MARKERS]) + ")")
    if p.consumes:
        keys = " ".join(f"~{prefix}{k}" for k in _ordered(set(p.consumes)))
        rules.append(f"({keys} {' '.join(GROUP_WRITE)})")
    if p.replays:
        keys = " ".join(f"~{prefix}{k}" for k in _ordered(set(p.replays)))
        rules.append(f"({keys} {' '.join(STREAM_WRITE)})")
    if p.deletes:
        keys = " ".join(f"~{prefix}{k}" for k in _ordered(set(p.deletes)))
        rules.append(f"({keys} +xdel)")
    return tuple(rules)


def acl_users(prefix: str = DEFAULT_PREFIX) -> list[AclUser]:
    """Every user in file order: default (off), admin, the services, the clients."""
    users = [
        AclUser("default", ("resetkeys", "resetchannels", "-@all")),
        AclUser(ADMIN, ("~*", "&*", "+@all")),
    ]
    users += [AclUser(p.redis_user, participant_rules(p, prefix)) for p in PARTICIPANTS.values()]
    return users


def render(passwords: Mapping[str, str] | None = None, prefix: str = DEFAULT_PREFIX) -> str:
    """The ACL file's text. `passwords` maps user -> password (default: the dev defaults)."""
    passwords = dict(dev_passwords() if passwords is None else passwords)
    lines = []
    for user in acl_users(prefix):
        lines.append(user.line(None if user.name == "default" else passwords[user.name]))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-o", "--output", type=Path, default=ACL_FILE, help=f"file to write (default {ACL_FILE.relative_to(REPO)})")
    parser.add_argument("--prefix", default=DEFAULT_PREFIX, help="stream name prefix (HELOX_TOPIC_PREFIX)")
    parser.add_argument("--from-env", action="store_true", help="passwords from HELOX_<USER>_REDIS_PASSWORD (all required)")
    parser.add_argument("--check", action="store_true", help="exit 1 if the file differs from a fresh generation")
    parser.add_argument("--stdout", action="store_true", help="print instead of writing")
    args = parser.parse_args(argv)

    text = render(env_passwords() if args.from_env else None, args.prefix)
    if args.check:
        current = args.output.read_text() if args.output.exists() else ""
        if current != text:
            print(f"{args.output} is stale: regenerate with `python deploy/acl.py`", file=sys.stderr)
            return 1
        return 0
    if args.stdout:
        sys.stdout.write(text)
        return 0
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    print(f"wrote {args.output} ({len(USERS)} users + default)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
