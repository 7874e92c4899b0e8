"""structlog set-up: JSON lines in production, readable lines in a terminal."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import MutableMapping
from typing import Any

import orjson
import structlog

from shared.settings import unknown_variables

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


# A traceback never shows the frames' local variables: the connect frame of a database
# driver holds the password, and any frame may hold a token or a key. structlog's
# dict_tracebacks (and its rich console traceback, when rich is installed) would print them.
_TRACEBACKS_WITHOUT_LOCALS = structlog.processors.ExceptionRenderer(
    structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
)


def configure(log_format: str = "auto", level: str = "info") -> None:
    """Configure structlog once per process. ``auto`` means console on a TTY, JSON otherwise."""
    as_json = log_format == "json" or (log_format == "auto" and not sys.stderr.isatty())
    shared_processors: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        _add_pid,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if as_json:
        processors: list[structlog.types.Processor] = [
            *shared_processors,
            _TRACEBACKS_WITHOUT_LOCALS,
            structlog.processors.JSONRenderer(serializer=orjson.dumps),
        ]
        logger_factory: Any = structlog.BytesLoggerFactory(sys.stderr.buffer)
    else:
        processors = [
            *shared_processors,
            structlog.dev.ConsoleRenderer(
                colors=False, exception_formatter=structlog.dev.plain_traceback
            ),
        ]
        logger_factory = structlog.PrintLoggerFactory(sys.stderr)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=logger_factory,
        cache_logger_on_first_use=True,
    )
    _route_standard_logging(as_json, shared_processors)


def _route_standard_logging(as_json: bool, shared_processors: list[Any]) -> None:
    """Libraries that use the standard library (aiohttp, aiomysql, asyncio) log through it, at
    WARNING and above; in JSON mode their lines are JSON too, with the same fields as ours plus
    ``logger``, so a log pipeline never meets a plain-text line among the JSON ones."""
    handler = logging.StreamHandler(sys.stderr)
    if as_json:
        handler.setFormatter(
            structlog.stdlib.ProcessorFormatter(
                foreign_pre_chain=[*shared_processors, structlog.stdlib.add_logger_name],
                processors=[
                    structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    _TRACEBACKS_WITHOUT_LOCALS,
                    structlog.processors.JSONRenderer(serializer=_json_text),
                ],
            )
        )
    else:
        handler.setFormatter(logging.Formatter("%(name)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)


def _json_text(value: Any, **_: Any) -> str:
    return orjson.dumps(value, default=str).decode()


def _add_pid(logger: Any, method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """The process id, so the lines of several gateway processes sharing a log can be told
    apart. Read once per process (each gateway process is a fresh interpreter, never a fork)."""
    event["pid"] = _PID
    return event


_PID = os.getpid()


def report_unknown_settings() -> None:
    """One warning per ``COUPON_*`` variable that no setting reads (a typo leaves the default
    in force; better to say so at start than to find out during a drop)."""
    log = structlog.get_logger("shared.settings")
    for name in unknown_variables():
        log.warning("unknown_setting_ignored", variable=name)
