"""What the gateway and the worker do first: read the settings, or stop with one line (exit 2,
the code supervisors and the gateway's tests read as "fix the configuration, do not restart"),
then configure logging and name any ``COUPON_*`` variable that nothing reads."""

from __future__ import annotations

import sys
from typing import NoReturn

from shared import logging as shared_logging
from shared.settings import ConfigError, Settings

CONFIG_ERROR_EXIT = 2


def settings_or_exit(program: str) -> Settings:
    """The process's settings from the environment, logging configured by them."""
    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        exit_on_config_error(program, exc)
    shared_logging.configure(settings.log_format, settings.log_level)
    shared_logging.report_unknown_settings()
    return settings


def exit_on_config_error(program: str, exc: ConfigError) -> NoReturn:
    print(f"{program}: configuration error: {exc}", file=sys.stderr)
    raise SystemExit(CONFIG_ERROR_EXIT) from None
