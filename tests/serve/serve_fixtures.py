"""A `moee serve` process on 127.0.0.1 and an ephemeral port, for the server tests; always stopped afterwards."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
API_KEY = "test-key-0123"


def require(*modules: str) -> None:
    for module in modules:
        pytest.importorskip(module, reason=f"the serve tests need {module} (pip install -e '.[test]')")


class ServerProcess:
    """`moee serve ARGS --port 0`, started and waited for until its ready line (or its exit)."""

    def __init__(self, model: Path, *args: str, env: dict | None = None, ready_timeout: float = 90.0, port: str = "0"):
        self.model = str(model)
        command = [sys.executable, "-m", "moee_ref.cli.main", "serve", "--model", self.model, "--port", port, *args]
        environment = {**os.environ, **(env or {})}
        environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), environment.get("PYTHONPATH")]))
        self.proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=environment,
                                     cwd=ROOT, start_new_session=True)
        self.lines: list[str] = []
        self.ready = threading.Event()
        self.url: str | None = None
        threading.Thread(target=self._read, daemon=True).start()
        deadline = time.monotonic() + ready_timeout
        while not self.ready.is_set() and self.proc.poll() is None and time.monotonic() < deadline:
            self.ready.wait(0.05)

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            if "ready at " in line and self.url is None:
                self.url = line.split("ready at ", 1)[1].split()[0]
                self.ready.set()
        self.ready.set()

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def check_ready(self) -> "ServerProcess":
        if self.url is None:
            self.stop()
            raise AssertionError(f"the server did not start:\n{self.output}")
        return self

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
