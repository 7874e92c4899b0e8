"""The settings are written once, as the fields of ``Settings``; everything else follows them.

The environment table is derived from the fields, the README's configuration table is held to
them here (every variable, and its default), and a ``COUPON_*`` variable that nothing reads is
reported when a process starts.
"""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys

from shared.settings import ENVIRONMENT, RUN_SCRIPT_VARIABLES, Settings, unknown_variables
from tests.helpers import REPO

NAME = re.compile(r"`(COUPON_[A-Z0-9_]+)`")
FIRST_CODE = re.compile(r"`([^`]*)`")


def _readme_rows() -> list[tuple[list[str], str]]:
    """(variables, default cell) of each row of the README's configuration table."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Configuration", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        if line.startswith("| `COUPON_"):
            cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
            rows.append((NAME.findall(cells[0]), cells[1]))
    return rows


def _shown(default: object) -> str:
    """A default as the README writes it."""
    if default is None:
        return "unset"
    if default == "":
        return "empty"
    if isinstance(default, bool):
        return str(default).lower()
    if isinstance(default, float) and default.is_integer():
        return str(int(default))
    return str(default)


def _documented(part: str) -> str:
    """The default a part of a default cell states: its first `code`, else its first word."""
    code = FIRST_CODE.match(part)
    return code.group(1) if code else part.split(maxsplit=1)[0].rstrip(":,")


def test_environment_table_is_derived_from_the_fields() -> None:
    fields = {field.name for field in dataclasses.fields(Settings)}
    assert {field for field, _ in ENVIRONMENT.values()} == fields
    for name, (field, _) in ENVIRONMENT.items():
        assert name == "COUPON_" + field.upper()


def test_readme_documents_every_setting_and_nothing_else() -> None:
    documented = [name for names, _ in _readme_rows() for name in names]
    assert len(documented) == len(set(documented)), "a variable has two rows"
    assert set(documented) == set(ENVIRONMENT) | RUN_SCRIPT_VARIABLES


def test_readme_defaults_are_the_fields_defaults() -> None:
    defaults = {
        field.name: field.default
        for field in dataclasses.fields(Settings)
        if field.default is not dataclasses.MISSING  # the worker name comes from the host
    }
    checked = 0
    for names, cell in _readme_rows():
        parts = [part.strip() for part in cell.split(" / ")]
        if len(parts) == 1:
            parts *= len(names)
        assert len(parts) == len(names), f"{names}: {cell!r} gives a default per variable"
        for name, part in zip(names, parts, strict=True):
            if name not in ENVIRONMENT or ENVIRONMENT[name][0] not in defaults:
                continue
            expected = _shown(defaults[ENVIRONMENT[name][0]])
            assert _documented(part) == expected, f"README says {name} defaults to {part!r}"
            checked += 1
    assert checked == len(defaults)


def test_unknown_coupon_variables_are_found_and_known_ones_are_not() -> None:
    env = {
        "COUPON_BATCHSIZE": "100",  # the typo of COUPON_BATCH_SIZE
        "COUPON_BATCH_SIZE": "100",
        "COUPON_MAX_WORKERS": "4",  # read by ./scripts/run
        "HOME": "/root",
    }
    assert unknown_variables(env) == ["COUPON_BATCHSIZE"]


def test_a_process_reports_an_unknown_variable_at_start() -> None:
    """couponctl stands for the three processes (they call the same report): a typo is named."""
    env = {
        "PATH": "/usr/bin:/bin",
        "COUPON_BACTH_SIZE": "100",
        # Nothing listens on port 1: the command fails fast after the start-up report.
        "COUPON_MYSQL_URL": "mysql://u:p@127.0.0.1:1/nothing",
        "COUPON_REDIS_URL": "redis://127.0.0.1:1/0",
    }
    done = subprocess.run(
        [sys.executable, "-m", "shared.ops.cli", "coupon", "show", "1"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode != 0
    assert "unknown_setting_ignored" in done.stderr
    assert "COUPON_BACTH_SIZE" in done.stderr
