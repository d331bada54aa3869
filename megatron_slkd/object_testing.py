"""A local S3-protocol server and a fault-injecting proxy, for tests and benchmarks.

``S3Server()`` starts moto's server mode (``pip install 'moto[server]'``) as a
separate process on a free port and stops it on ``close()``;
``server.environment()`` is what a user's S3 client reads (endpoint,
credentials, region). ``FaultProxy(upstream)`` forwards every HTTP request to
``upstream`` after ``delay`` seconds, and can answer the next requests with an
HTTP error (``fail(status, times)``), forward them and lose the answer
(``lose(status, times)``) or hold them (``stall(seconds, times)``),
so latency, throttling, outages and timeouts are reproduced against a real
server through the same clients.
"""

from __future__ import annotations

import http.client
import os
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

from megatron_slkd.launch import free_port

__all__ = ["S3Server", "FaultProxy"]


class S3Server:
    """moto's S3 server in its own process, on a free local port."""

    def __init__(self, timeout: float = 60.0):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.time() + timeout
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    break
            except OSError:
                if self._proc.poll() is not None or time.time() > deadline:
                    self.close()
                    raise RuntimeError(f"moto server did not start on port {self.port}") from None
                time.sleep(0.1)

    def environment(self, endpoint: str | None = None) -> dict[str, str]:
        """The variables an S3 client reads to reach this server (or ``endpoint``)."""
        return {
            "AWS_ENDPOINT_URL": endpoint or self.url,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def create_bucket(self, name: str) -> None:
        import boto3

        boto3.client("s3", endpoint_url=self.url, aws_access_key_id="testing",
                     aws_secret_access_key="testing",
                     region_name="us-east-1").create_bucket(Bucket=name)  # fmt: skip

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()


class FaultProxy:
    """An HTTP proxy in front of ``upstream`` that delays, fails or holds requests."""

    def __init__(self, upstream: str, delay: float = 0.0):
        up = urlparse(upstream)
        self._upstream = (up.hostname, up.port)
        self.delay = delay
        self.requests = 0
        self._faults: list[tuple[str, float, str | None]] = []  # (kind, value, method)
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _relay(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                fault = proxy._next_fault(self.command)
                if proxy.delay:
                    time.sleep(proxy.delay)
                if fault is not None and fault[0] == "stall":
                    time.sleep(fault[1])
                if fault is not None and fault[0] == "status":
                    data = b"<Error><Code>InjectedFault</Code><Message>injected</Message></Error>"
                    self.send_response(int(fault[1]))
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                    return
                conn = http.client.HTTPConnection(*proxy._upstream, timeout=120)
                try:
                    headers = {k: v for k, v in self.headers.items()}
                    conn.request(self.command, self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                finally:
                    conn.close()
                if fault is not None and fault[0] == "lose":  # applied, but its answer lost
                    self.send_error(int(fault[1]))
                    return
                self.send_response(resp.status)
                head = self.command == "HEAD"  # keeps the object's Content-Length
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection") and (
                        head or k.lower() != "content-length"
                    ):
                        self.send_header(k, v)
                if not head:
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if not head:
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _relay

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address):
                pass  # a client that gave up on a held request: nothing to report

        self._server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def _next_fault(self, method: str):
        with self._lock:
            self.requests += 1
            for i, fault in enumerate(self._faults):
                if fault[2] in (None, method):
                    return self._faults.pop(i)
            return None

    @property
    def pending(self) -> int:
        """Faults not yet applied."""
        with self._lock:
            return len(self._faults)

    def fail(self, status: int, times: int = 1, method: str | None = None) -> None:
        """Answer the next ``times`` requests (of ``method`` only, if given) with HTTP
        ``status``, without forwarding them."""
        with self._lock:
            self._faults += [("status", float(status), method)] * times

    def lose(self, status: int = 503, times: int = 1, method: str | None = None) -> None:
        """Forward the next ``times`` requests (of ``method`` only, if given), then answer
        HTTP ``status`` instead of the server's answer: a write applied whose answer was
        lost, which the client retries."""
        with self._lock:
            self._faults += [("lose", float(status), method)] * times

    def stall(self, seconds: float, times: int = 1, method: str | None = None) -> None:
        """Hold the next ``times`` requests (of ``method`` only, if given) for ``seconds``
        before forwarding them."""
        with self._lock:
            self._faults += [("stall", float(seconds), method)] * times

    def clear(self) -> None:
        with self._lock:
            self._faults.clear()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def msc_config(path, profile: str, bucket: str, endpoint: str, retry: dict | None = None,
               **options) -> str:  # fmt: skip
    """Write an MSC config file with an S3 ``profile`` on ``bucket`` at ``endpoint`` (the
    credentials stay in the environment; ``retry`` is the profile's MSC retry section,
    ``options`` add to the provider's, e.g. ``read_timeout``); returns its path, for
    ``MSC_CONFIG``."""
    import json

    config = {
        "profiles": {
            profile: {
                "storage_provider": {
                    "type": "s3",
                    "options": {"base_path": bucket, "endpoint_url": endpoint,
                                "region_name": "us-east-1", **options},
                },
                **({"retry": retry} if retry else {}),
            }
        }
    }  # fmt: skip
    with open(path, "w") as f:
        json.dump(config, f)
    os.chmod(path, 0o600)
    return str(path)
