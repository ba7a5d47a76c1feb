"""pytest fixtures for herald's real-client tests: start the binary on free ports.

Env: HERALD_BIN (path to the binary), HERALD_BACKEND (auto|uring|epoll).
"""
import json
import os
import signal
import socket
import subprocess
import tempfile
import time
import urllib.parse
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 10.0  # seconds; every network wait is bounded


def _default_bin() -> str:
    env = os.environ.get("HERALD_BIN")
    if env:
        return str(Path(env).resolve())
    for rel in ("target/release/herald", "target/debug/herald"):
        if (ROOT / rel).exists():
            return str(ROOT / rel)
    return str(ROOT / "target/release/herald")


HERALD_BIN = _default_bin()
HERALD_BACKEND = os.environ.get("HERALD_BACKEND", "auto")


def free_port() -> int:
    """Bind port 0 on 127.0.0.1, read the port, close."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Herald:
    def __init__(self, bin_path=HERALD_BIN, backend=HERALD_BACKEND, extra_args=(), listen_port=None, ingest_port=None):
        self.bin = bin_path
        self.backend = backend
        self.extra_args = list(extra_args)
        self.listen_port = listen_port or free_port()
        self.ingest_port = ingest_port or free_port()
        while self.ingest_port == self.listen_port:
            self.ingest_port = free_port()
        self.base = f"http://127.0.0.1:{self.listen_port}"
        self.proc = None
        self._log = tempfile.TemporaryFile()

    @property
    def args(self):
        return [self.bin, "serve",
                "--listen", f"127.0.0.1:{self.listen_port}",
                "--ingest", f"127.0.0.1:{self.ingest_port}",
                "--backend", self.backend,
                "--workers", "2", *self.extra_args]

    def logs(self) -> str:
        self._log.seek(0)
        return self._log.read().decode("utf-8", "replace")[-8000:]

    def start(self, ready_timeout: float = 10.0) -> "Herald":
        deadline = time.monotonic() + ready_timeout
        while True:
            env = {"RUST_BACKTRACE": "1", **os.environ}
            self.proc = subprocess.Popen(self.args, stdout=self._log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=env)
            while time.monotonic() < deadline and self.proc.poll() is None:
                try:
                    r = httpx.get(f"{self.base}/healthz", timeout=1.0)
                    if r.status_code == 200:
                        return self
                except httpx.HTTPError:
                    pass
                time.sleep(0.05)
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(5)
                raise RuntimeError(f"herald not ready after {ready_timeout}s: {self.args}\n{self.logs()}")
            if time.monotonic() >= deadline:
                raise RuntimeError(f"herald exited during start-up ({self.proc.returncode}): {self.args}\n{self.logs()}")
            time.sleep(0.2)  # e.g. port still held right after a restart: retry

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM and wait; returns the exit code (negative = killed by a signal)."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            raise RuntimeError(f"herald did not exit within {timeout}s of SIGTERM\n{self.logs()}")
        self.proc = None
        return code

    def restart(self) -> int:
        code = self.stop()
        self.start()
        return code

    def publish(self, events, timeout: float = TIMEOUT) -> str:
        """NDJSON over the ingest socket; half-close; return the reply (error lines)."""
        if isinstance(events, dict):
            events = [events]
        payload = "".join(json.dumps(e) + "\n" for e in events).encode()
        with socket.create_connection(("127.0.0.1", self.ingest_port), timeout=timeout) as s:
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
            chunks = []
            deadline = time.monotonic() + timeout
            while True:
                s.settimeout(max(0.1, deadline - time.monotonic()))
                chunk = s.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
        return b"".join(chunks).decode()

    def publish_http(self, topic: str, data: str, **params) -> dict:
        r = httpx.post(f"{self.base}/publish/{urllib.parse.quote(topic, safe='/')}",
                       content=data.encode(), params=params, timeout=TIMEOUT)
        assert r.status_code == 200, f"POST /publish/{topic} -> {r.status_code}: {r.text}"
        return r.json()


@pytest.fixture(scope="module")
def herald():
    h = Herald().start()
    yield h
    code = h.stop()
    assert code == 0, f"herald should exit 0 on SIGTERM, got {code}\n{h.logs()}"


_seq = [0]


@pytest.fixture
def topic(request):
    _seq[0] += 1
    return f"py-{request.node.name.replace('[', '-').replace(']', '')[:40]}-{os.getpid()}-{_seq[0]}"
