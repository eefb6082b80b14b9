"""Child processes that cannot outlive us, and the small HTTP client the control APIs need.

Every process is started with stdin kept open as a pipe and PR_SET_PDEATHSIG, so it dies with
us even when the test run is killed; context managers stop it (TERM, then KILL) on any exit.
Everything binds 127.0.0.1 on ports chosen at run time.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Sequence

from .paths import REPO

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Runs in the child before exec: get SIGTERM when the thread that started us exits."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


_HANDED_OUT: set[int] = set()
_PORT_LOCK = threading.Lock()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago and that this process has not handed
    out before (the kernel may offer a just-closed port again, e.g. for two listeners of one
    Envoy). Listeners use enable_reuse_port: false, so a clash fails loudly instead of sharing
    connections."""
    with _PORT_LOCK:
        for _ in range(1000):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                sock.bind(("127.0.0.1", 0))
                port = sock.getsockname()[1]
            if port not in _HANDED_OUT:
                _HANDED_OUT.add(port)
                return port
    raise RuntimeError("no fresh free port on 127.0.0.1 after 1000 tries")


_LIVE: set["Proc"] = set()
_LIVE_LOCK = threading.Lock()


def live_processes() -> list["Proc"]:
    """Every process started here that has not been stopped yet."""
    with _LIVE_LOCK:
        return list(_LIVE)


def stop_all() -> None:
    """Stops every process started here that is still running."""
    for proc in live_processes():
        proc.stop()


class Proc:
    """A child process with stdout/stderr in files and stdin held open as a pipe."""

    def __init__(self, name: str, argv: Sequence[str | os.PathLike], workdir: Path, env=None):
        self.name = name
        self.argv = [str(a) for a in argv]
        self.stdout_path = workdir / f"{name}.stdout"
        self.stderr_path = workdir / f"{name}.stderr"
        self._stdout = open(self.stdout_path, "wb")
        self._stderr = open(self.stderr_path, "wb")
        self.popen = subprocess.Popen(
            self.argv,
            stdin=subprocess.PIPE,
            stdout=self._stdout,
            stderr=self._stderr,
            preexec_fn=die_with_parent,
            env=env,
            cwd=REPO,
        )
        with _LIVE_LOCK:
            _LIVE.add(self)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def running(self) -> bool:
        return self.popen.poll() is None

    def stdout_text(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    def stderr_text(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def wait(self, timeout: float | None = None) -> int:
        return self.popen.wait(timeout=timeout)

    def stop(self, timeout: float = 5.0) -> int | None:
        """TERM, then KILL after `timeout` seconds. Idempotent."""
        if self.popen.poll() is None:
            try:
                self.popen.send_signal(signal.SIGTERM)
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=timeout)
            except ProcessLookupError:
                pass
        if self.popen.stdin and not self.popen.stdin.closed:
            try:
                self.popen.stdin.close()
            except OSError:
                pass
        for handle in (self._stdout, self._stderr):
            if not handle.closed:
                handle.close()
        with _LIVE_LOCK:
            _LIVE.discard(self)
        return self.popen.returncode

    def tail(self, lines: int = 40) -> str:
        text = self.stderr_text().splitlines()[-lines:]
        return "\n".join(text)


class Managed:
    """A started process with a work folder: a context manager that stops it and removes the
    folder (when it made it). Subclasses set `proc`, `workdir`, `_own_workdir` and define
    `start_process()`."""

    proc: Proc | None = None
    workdir: Path
    _own_workdir: bool = False

    def start_process(self):  # pragma: no cover - overridden
        return self

    def __enter__(self):
        return self.start_process()

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.proc:
            self.proc.stop()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)


def http_request(method: str, url: str, body: bytes | None = None, timeout: float = 5.0) -> tuple[int, str]:
    """(status, body) of one HTTP request; an error status is returned, not raised."""
    request = urllib.request.Request(url, data=body, method=method)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read().decode(errors="replace")
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode(errors="replace")
