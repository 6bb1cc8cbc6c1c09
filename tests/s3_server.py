"""A real S3 endpoint on localhost for the object-storage tests: moto's standalone server
as a subprocess, and a TCP proxy in front of it that counts the bytes it relays and can
break requests on purpose (cut a response after some bytes, or answer with an HTTP
error without asking the server)."""
from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
import urllib.request
from typing import Callable, List, Optional, Tuple

from tests.conftest import free_port


class MotoServer:
    """``python -m moto.server`` on 127.0.0.1 at a free port; ``stop()`` ends it by its pid."""

    def __init__(self, timeout: float = 30.0):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto.server exited with {self.proc.returncode}")
            try:
                urllib.request.urlopen(self.url + "/moto-api/", timeout=1).read()
                return
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"moto.server did not answer on {self.url} within {timeout} s")
                time.sleep(0.1)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# What the proxy does with one request: relay it, relay it but cut the connection after
# ``n`` bytes of the response ("cut", n), or answer ("status", code) itself.
Action = Tuple[str, int]
PASS: Action = ("pass", 0)


def _pass(method: str, target: str, rng: str) -> Action:
    return PASS

_REASONS = {403: "Forbidden", 404: "Not Found", 500: "Internal Server Error", 503: "Service Unavailable"}
_CODES = {403: "AccessDenied", 404: "NoSuchKey", 500: "InternalError", 503: "ServiceUnavailable"}


def _error_response(code: int, head: bool) -> bytes:
    body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{_CODES.get(code, str(code))}</Code>'
            f"<Message>injected by the test proxy</Message></Error>").encode()
    header = (f"HTTP/1.1 {code} {_REASONS.get(code, 'Error')}\r\nContent-Type: application/xml\r\n"
              f"Content-Length: {len(body)}\r\nConnection: keep-alive\r\n\r\n").encode()
    return header if head else header + body


class FaultProxy:
    """A threaded TCP proxy on 127.0.0.1 to ``upstream`` (host, port). It reads each HTTP
    request on a connection (clients send one at a time and wait for its response) and
    asks ``rule(method, target, range)`` what to do with it (``range``: the Range header's
    value, or ""). ``sent`` counts the bytes relayed to clients (headers included),
    ``requests`` logs (method, target, range, action), ``cuts`` the connections cut
    mid-response."""

    def __init__(self, upstream: Tuple[str, int]):
        self.upstream = upstream
        self.rule: Callable[[str, str, str], Action] = _pass
        self.sent = 0
        self.cuts = 0
        self.requests: List[Tuple[str, str, str, Action]] = []
        self._lock = threading.Lock()
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._closed = False
        threading.Thread(target=self._accept, daemon=True, name="s3-proxy").start()

    def reset(self, rule: Optional[Callable[[str, str, str], Action]] = None) -> None:
        with self._lock:
            self.rule = rule or _pass
            self.sent, self.cuts, self.requests = 0, 0, []

    def close(self) -> None:
        self._closed = True
        self._sock.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            server = socket.create_connection(self.upstream)
        except OSError:
            client.close()
            return
        # The response relay cuts after ``budget[0]`` more bytes when it is >= 0.
        budget = [-1]
        done = threading.Event()

        def close_both():
            done.set()
            for s in (client, server):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()

        def relay_responses():
            try:
                while not done.is_set():
                    data = server.recv(65536)
                    if not data:
                        break
                    with self._lock:
                        if budget[0] >= 0:
                            data = data[:budget[0]]
                            budget[0] -= len(data)
                        self.sent += len(data)
                    client.sendall(data)
                    if budget[0] == 0:
                        with self._lock:
                            self.cuts += 1
                        break
            except OSError:
                pass
            close_both()

        threading.Thread(target=relay_responses, daemon=True).start()
        buf = b""
        try:
            while not done.is_set():
                while b"\r\n\r\n" not in buf:
                    data = client.recv(65536)
                    if not data:
                        raise EOFError
                    buf += data
                head, buf = buf.split(b"\r\n\r\n", 1)
                lines = head.decode("latin-1").split("\r\n")
                method, target = lines[0].split(" ")[:2]
                length, rng = 0, ""
                for line in lines[1:]:
                    name, _, value = line.partition(":")
                    if name.strip().lower() == "content-length":
                        length = int(value.strip())
                    elif name.strip().lower() == "range":
                        rng = value.strip()
                while len(buf) < length:
                    data = client.recv(65536)
                    if not data:
                        raise EOFError
                    buf += data
                body, buf = buf[:length], buf[length:]
                with self._lock:
                    action = self.rule(method, target, rng)
                    self.requests.append((method, target, rng, action))
                if action[0] == "status":
                    reply = _error_response(action[1], method == "HEAD")
                    with self._lock:
                        self.sent += len(reply)
                    client.sendall(reply)
                    continue
                with self._lock:
                    budget[0] = action[1] if action[0] == "cut" else -1
                server.sendall(head + b"\r\n\r\n" + body)
        except (OSError, EOFError, ValueError):
            pass
        close_both()
