"""``python -m gateway`` / ``coupon-gateway``: serve the gateway."""

from __future__ import annotations

import ctypes
import os
import resource
import signal
from pathlib import Path

import structlog

from gateway import listener
from gateway.app import create_app
from shared import metrics
from shared.settings import ConfigError, redact_url
from shared.startup import exit_on_config_error, settings_or_exit


def main() -> None:
    settings = settings_or_exit("coupon-gateway")
    log = structlog.get_logger("gateway")
    # One of several processes on this port, started by a supervisor (supervisord: see
    # deploy/supervisord/gateway.conf): share the port, and the metrics through their folder.
    one_of_many = settings.gateway_processes > 1
    if one_of_many and metrics.multiprocess_dir() is None:
        exit_on_config_error(
            "coupon-gateway",
            ConfigError(
                "COUPON_GATEWAY_PROCESSES > 1 needs PROMETHEUS_MULTIPROC_DIR, a folder the"
                " processes share, or /metrics would show one process's share"
            ),
        )
    if one_of_many:
        _end_with_the_supervisor()
    metrics.forget_dead_processes()
    if not settings.admin_actors:
        log.warning(
            "admin_api_disabled", reason="neither COUPON_ADMIN_TOKEN nor _TOKENS is set"
        )
    if settings.auth == "none":
        log.warning(
            "identity_not_verified",
            reason="COUPON_AUTH=none: the user id in the request body is trusted as is",
        )
    _warn_if_backlog_capped(settings.listen_backlog, log)
    _open_files_for(settings.max_subscribers, log)
    log.info(
        "gateway_starting",
        host=settings.http_host,
        port=settings.http_port,
        redis=redact_url(settings.redis_url),
        mysql=settings.mysql.redacted(),
        auth=settings.auth,
        admin_port=settings.admin_port or None,
    )
    try:
        sock = listener.listening_socket(
            settings.http_host,
            settings.http_port,
            backlog=settings.listen_backlog,
            reuse_port=one_of_many,
        )
        listener.serve(
            create_app(settings),
            sock,
            shutdown_timeout=settings.shutdown_grace_seconds,
            keepalive_timeout=settings.keepalive_timeout_seconds,
            # A client that stalled in its body has had its time already.
            lingering_time=settings.body_read_timeout_seconds,
        )
    except ConfigError as exc:  # found at start-up, e.g. a Redis that may evict keys
        exit_on_config_error("coupon-gateway", exc)
    except OSError as exc:
        log.error("gateway_start_failed", error=str(exc))
        raise SystemExit(1) from None
    finally:
        metrics.mark_process_dead(os.getpid())


# prctl(2): the signal a process gets when its parent ends.
_PR_SET_PDEATHSIG = 1


def _end_with_the_supervisor() -> None:
    """One of several processes on a port stops (SIGTERM: it drains first) when the supervisor
    that started it is gone, even killed outright: an orphan would keep serving on the shared
    port beside the processes of the next supervisor, on old settings. Linux only; elsewhere
    the supervisor's own stop is all there is."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        return


SOMAXCONN = Path("/proc/sys/net/core/somaxconn")


def _warn_if_backlog_capped(backlog: int, log: structlog.typing.FilteringBoundLogger) -> None:
    """The kernel silently caps every listen queue at ``net.core.somaxconn``; a short queue
    drops the SYNs of a drop's first second, and each dropped SYN costs its client a 1 s, then
    3 s, retransmission. Say so at start, with the value that would fix it."""
    try:
        limit = int(SOMAXCONN.read_text())
    except (OSError, ValueError):
        return
    if limit < backlog:
        log.warning(
            "listen_backlog_capped",
            backlog=backlog,
            somaxconn=limit,
            fix=f"sysctl -w net.core.somaxconn={backlog} (see README: the listen backlog)",
        )


# File descriptors a process needs besides its feed subscribers: clients in flight, Redis and
# MySQL connections, the listeners, log and metrics files.
_DESCRIPTORS_BESIDES_THE_FEED = 4096


def _open_files_for(subscribers: int, log: structlog.typing.FilteringBoundLogger) -> None:
    """Every live feed subscriber holds a socket: raise the soft open-files limit to the hard
    one (an unprivileged process may), and say so at start when even that is too few for
    ``COUPON_MAX_SUBSCRIBERS``: past it, connections fail with EMFILE, not a 503."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    needed = subscribers + _DESCRIPTORS_BESIDES_THE_FEED
    if soft != resource.RLIM_INFINITY and soft < needed:
        log.warning(
            "open_files_limit_low", limit=soft, needed=needed,
            fix="raise ulimit -n (LimitNOFILE=, or the container's nofile) or lower"
            " COUPON_MAX_SUBSCRIBERS",
        )  # fmt: skip


if __name__ == "__main__":
    main()
