"""Launching multi-process runs from the tests (accelerate launch / torchrun on CPU, gloo)."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

PORT_FLAGS = ("--main_process_port", "--master_port")


def free_port() -> int:
    """A TCP port that was free a moment ago (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_launcher(cmd: list[str], *, env: dict[str, str], cwd: str | Path,
                 timeout: int) -> subprocess.CompletedProcess:
    """Run ``cmd`` once more on a new port if another process took its port in between
    :func:`free_port` and the launcher's bind (the only race in picking a port this way)."""
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    at = [i + 1 for i, arg in enumerate(cmd[:-1]) if arg in PORT_FLAGS]
    if proc.returncode != 0 and at and "address already in use" in (proc.stdout + proc.stderr).lower():
        cmd = list(cmd)
        cmd[at[0]] = str(free_port())
        proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    return proc
