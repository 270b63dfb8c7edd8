"""Running the app on uvicorn: the socket bound before the model loads (a port in use is known at once), the
ready line once it listens, and the stop: the first SIGTERM or SIGINT answers new requests 503, lets the accepted
ones finish (at most --shutdown-timeout seconds) and exits 0; a second one exits at once."""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import os
import signal
import socket
import sys
import time

import uvicorn

from ..errors import MoEERefError
from .app import Service, build_app


class ServeError(MoEERefError):
    """The server cannot start: the address is taken or refused."""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int) -> socket.socket:
    """A bound socket, not yet listening: clients are refused until the model has loaded."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ServeError(f"cannot bind {host}:{port}: {exc.strerror}") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise ServeError(f"{host}:{port} is already in use; stop the other server or choose another --port") from None
        raise ServeError(f"cannot bind {host}:{port}: {exc.strerror}") from None
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, service: Service, ready_line: str, sock: socket.socket, stream=sys.stderr):
        super().__init__(config)
        self.service = service
        self.ready_line = ready_line
        self.sock = sock
        self.stream = stream
        self.stop_started: float | None = None

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets=sockets)
        if self.started and not self.should_exit:
            print(f"moee serve: ready at {url_of(self.sock)} ({self.ready_line})", file=self.stream, flush=True)

    def handle_exit(self, sig: int, frame) -> None:
        """First signal: drain, then exit 0. Second: exit now (uvicorn's own re-raise of the signal is not wanted)."""
        if self.stop_started is not None:
            print(f"moee serve: {signal.Signals(sig).name} again: exiting now", file=self.stream, flush=True)
            os._exit(128 + sig)
        self.stop_started = time.monotonic()
        self.service.stopping = True
        print(f"moee serve: {signal.Signals(sig).name}: finishing {self.service.in_flight} accepted request(s), "
              "answering new ones 503", file=self.stream, flush=True)
        asyncio.get_event_loop().call_soon_threadsafe(lambda: asyncio.ensure_future(self.drain()))

    async def drain(self) -> None:
        deadline = self.stop_started + self.service.config.shutdown_timeout
        while self.service.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if self.service.in_flight:
            print(f"moee serve: {self.service.in_flight} request(s) still running after {self.service.config.shutdown_timeout:g} s; "
                  "exiting anyway", file=self.stream, flush=True)
        self.should_exit = True


def run_server(service: Service, sock: socket.socket, ready_line: str) -> int:
    """Serve until stopped; 0 after a graceful stop."""
    config = uvicorn.Config(build_app(service), log_level="warning", access_log=False, lifespan="off",
                            timeout_graceful_shutdown=5, timeout_keep_alive=5)
    server = Server(config, service, ready_line, sock)
    service.batcher.start()
    try:
        server.run(sockets=[sock])
    finally:
        service.batcher.close()
        service.batcher.join(timeout=5)
    if not server.started:
        return 1
    print("moee serve: stopped", file=sys.stderr, flush=True)
    return 0
