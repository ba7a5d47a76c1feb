"""pytest fixtures for herald's real-client tests: start the binary on free ports.

Env: HERALD_BIN (path to the binary), HERALD_BACKEND (auto|uring|epoll).
"""
import json
import os
import re
import signal
import socket
import ssl
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
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def free_port() -> int:
    """Bind port 0 on 127.0.0.1, read the port, close."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Herald:
    """One herald process on free ports.

    tls: None, or a dict with "pairs" (list of (cert, key) paths, the first the default),
    "ca" (the CA file clients trust; used for the readiness check when the plaintext
    listener is off) and optionally "hsts" (e.g. "1d"). plain=False runs with --listen off.
    """

    def __init__(self, bin_path=HERALD_BIN, backend=HERALD_BACKEND, extra_args=(), listen_port=None,
                 ingest_port=None, tls=None, plain=True):
        self.bin = bin_path
        self.backend = backend
        self.extra_args = list(extra_args)
        self.tls = tls
        self.plain = plain
        used = set()

        def pick(port):
            port = port or free_port()
            while port in used:
                port = free_port()
            used.add(port)
            return port

        self.listen_port = pick(listen_port) if plain else None
        self.ingest_port = pick(ingest_port)
        self.tls_port = pick(None) if tls else None
        self.base = f"http://127.0.0.1:{self.listen_port}" if plain else None
        self.tls_base = f"https://127.0.0.1:{self.tls_port}" if tls else None
        self.proc = None
        self._log = tempfile.TemporaryFile()

    @property
    def args(self):
        a = [self.bin, "serve",
             "--listen", f"127.0.0.1:{self.listen_port}" if self.plain else "off",
             "--ingest", f"127.0.0.1:{self.ingest_port}",
             "--backend", self.backend,
             "--workers", "2"]
        if self.tls:
            a += ["--tls-listen", f"127.0.0.1:{self.tls_port}"]
            for cert, key in self.tls["pairs"]:
                a += ["--tls-cert", str(cert), "--tls-key", str(key)]
            if self.tls.get("hsts"):
                a += ["--hsts", self.tls["hsts"]]
        return a + self.extra_args

    def logs(self, tail: int = 8000) -> str:
        """herald's output (stdout + stderr), without colour codes; the last `tail` chars."""
        self._log.seek(0)
        text = ANSI.sub("", self._log.read().decode("utf-8", "replace"))
        return text[-tail:] if tail else text

    def _ready_get(self):
        if self.plain:
            return httpx.get(f"{self.base}/healthz", timeout=1.0)
        ctx = ssl.create_default_context(cafile=str(self.tls["ca"]))
        return httpx.get(f"{self.tls_base}/healthz", timeout=1.0, verify=ctx)

    def start(self, ready_timeout: float = 10.0) -> "Herald":
        deadline = time.monotonic() + ready_timeout
        while True:
            env = {"RUST_BACKTRACE": "1", **os.environ}
            self.proc = subprocess.Popen(self.args, stdout=self._log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=env)
            while time.monotonic() < deadline and self.proc.poll() is None:
                try:
                    r = self._ready_get()
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
        base, verify = (self.base, True) if self.plain else (self.tls_base, self.tls_context())
        r = httpx.post(f"{base}/publish/{urllib.parse.quote(topic, safe='/')}",
                       content=data.encode(), params=params, timeout=TIMEOUT, verify=verify)
        assert r.status_code == 200, f"POST /publish/{topic} -> {r.status_code}: {r.text}"
        return r.json()

    def tls_context(self) -> ssl.SSLContext:
        """A client context that trusts only the test CA (verification on, hostname checked)."""
        return ssl.create_default_context(cafile=str(self.tls["ca"]))

    def metrics(self) -> dict:
        """GET /metrics: {name: value} of the unlabelled (process-wide) samples."""
        if self.plain:
            r = httpx.get(f"{self.base}/metrics", timeout=TIMEOUT)
        else:
            r = httpx.get(f"{self.tls_base}/metrics", timeout=TIMEOUT, verify=self.tls_context())
        assert r.status_code == 200, f"GET /metrics -> {r.status_code}"
        out = {}
        for line in r.text.splitlines():
            if line.startswith("#") or "{" in line or not line.strip():
                continue
            name, _, value = line.partition(" ")
            try:
                out[name] = float(value)
            except ValueError:
                pass
        return out

    def metric(self, name: str) -> float:
        m = self.metrics()
        assert name in m, f"/metrics has no {name}: {sorted(m)}"
        return m[name]

    def wait_metric(self, name: str, pred, what: str, timeout: float = TIMEOUT) -> float:
        """Poll /metrics until pred(value of name) holds; fail after timeout."""
        deadline = time.monotonic() + timeout
        while True:
            v = self.metric(name)
            if pred(v):
                return v
            assert time.monotonic() < deadline, f"{what}: {name} = {v} after {timeout}s\n{self.logs()}"
            time.sleep(0.05)

    def wait_log(self, needle: str, count: int = 1, timeout: float = TIMEOUT) -> None:
        """Wait until herald's output holds `needle` at least `count` times."""
        deadline = time.monotonic() + timeout
        while self.logs(tail=0).count(needle) < count:
            assert time.monotonic() < deadline, f"no {needle!r} (x{count}) in herald's log within {timeout}s\n{self.logs()}"
            time.sleep(0.05)


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


# ---------------------------------------------------------------- TLS fixtures

TLS_FIXTURE = ROOT / "tests" / "clients" / "tls-fixture.sh"


class Pki:
    """A test CA and leaves made fresh by tests/clients/tls-fixture.sh in `dir`."""

    def __init__(self, dir: Path):
        self.dir = Path(dir)
        subprocess.run([str(TLS_FIXTURE), str(self.dir)], check=True, timeout=60)
        self.ca = self.dir / "ca.pem"
        self.serials = dict(line.split("=", 1) for line in (self.dir / "serials.env").read_text().split())

    def pair(self, name: str):
        """(cert, key) paths of the leaf `name`: localhost, other or reloaded."""
        return self.dir / f"{name}.pem", self.dir / f"{name}.key"

    def serial(self, name: str) -> str:
        return self.serials[f"{name.upper()}_SERIAL"]


@pytest.fixture(scope="session")
def pki():
    """A fresh test CA for this run, in a temporary directory removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="herald-pki-") as d:
        yield Pki(Path(d))
