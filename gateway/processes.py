"""``COUPON_GATEWAY_PROCESSES=N``: N gateway processes sharing one port.

The ``coupon-gateway`` command started with N > 1 becomes a small supervisor: it starts N
children that each serve the whole app on the same host and port (``SO_REUSEPORT``: the kernel
spreads new connections over them), restarts a child that dies, and on SIGTERM or SIGINT passes
the signal on and waits for every child to finish its in-flight requests. The children share a
metrics folder (prometheus_client multiprocess mode), so any scrape of ``/metrics`` reports the
totals of all of them; without ``PROMETHEUS_MULTIPROC_DIR`` the supervisor makes a private one.
The gateway is stateless, so this is all it takes; compose and Kubernetes can equally run one
process per container and scale containers instead.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType

import structlog

from shared import metrics
from shared.settings import Settings

log = structlog.get_logger("gateway.processes")

CHILD_FLAG = "--serve-one"
"""Argument that makes ``python -m gateway`` serve as one of several processes."""

# A child that keeps dying is restarted at most this often, so a broken deployment does not
# spin; a configuration error (exit code 2) is not retried at all.
RESTART_BACKOFF_SECONDS = 1.0
CONFIG_ERROR = 2


class Supervisor:
    """Starts, watches and stops the gateway processes."""

    def __init__(self, settings: Settings) -> None:
        self._count = settings.gateway_processes
        self._grace = settings.shutdown_grace_seconds + 5.0
        self._env = dict(os.environ)
        self._own_metrics_dir: str | None = None
        self._children: dict[int, subprocess.Popen[bytes]] = {}
        self._started_at: dict[int, float] = {}
        self._stopping = False

    def run(self) -> int:
        self._prepare_metrics_dir()
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_signal)
        try:
            for slot in range(self._count):
                self._start(slot)
            log.info("gateway_processes_started", processes=self._count)
            return self._watch()
        finally:
            self._kill_remaining()
            if self._own_metrics_dir is not None:
                shutil.rmtree(self._own_metrics_dir, ignore_errors=True)

    def _prepare_metrics_dir(self) -> None:
        folder = self._env.get(metrics.MULTIPROC_ENV)
        if folder:  # given by the operator: start from empty totals
            for stale in Path(folder).glob("*.db"):
                stale.unlink()
        else:
            self._own_metrics_dir = tempfile.mkdtemp(prefix="coupon-gateway-metrics-")
            self._env[metrics.MULTIPROC_ENV] = self._own_metrics_dir

    def _start(self, slot: int) -> None:
        self._children[slot] = subprocess.Popen(
            [sys.executable, "-m", "gateway", CHILD_FLAG], env=self._env
        )
        self._started_at[slot] = time.monotonic()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if not self._stopping:
            log.info("gateway_processes_stopping", signal=signal.Signals(signum).name)
        self._stopping = True
        for child in self._children.values():
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)

    def _watch(self) -> int:
        """Restart children that die until told to stop; then wait for all of them."""
        deadline: float | None = None
        worst = 0
        while True:
            for slot, child in list(self._children.items()):
                code = child.poll()
                if code is None or self._stopping:
                    continue
                metrics.mark_process_dead(child.pid)
                if code == CONFIG_ERROR:
                    log.error("gateway_process_config_error", pid=child.pid)
                    self._on_signal(signal.SIGTERM, None)
                    worst = CONFIG_ERROR
                    continue
                log.error("gateway_process_died", pid=child.pid, code=code, slot=slot)
                wait = RESTART_BACKOFF_SECONDS - (time.monotonic() - self._started_at[slot])
                time.sleep(max(wait, 0.0))
                self._start(slot)
            if self._stopping:
                deadline = deadline or time.monotonic() + self._grace
                codes = [child.poll() for child in self._children.values()]
                if all(code is not None for code in codes):
                    for child in self._children.values():
                        metrics.mark_process_dead(child.pid)
                    return max([worst, *(abs(code or 0) for code in codes)])
                if time.monotonic() > deadline:
                    log.error("gateway_processes_killed", grace_seconds=self._grace)
                    return 1
            time.sleep(0.1)

    def _kill_remaining(self) -> None:
        for child in self._children.values():
            if child.poll() is None:
                child.kill()
                child.wait()
