"""wrk as the benchmarks drive it: the request script beside this file and what it prints.

``post_issue.lua`` is a wrk script (run by wrk, in the benchmark machine's client); the
service's own Redis script is a different thing, ``shared/redis/lua/issue.lua``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

WRK_SCRIPT = Path(__file__).with_name("post_issue.lua")


def wrk_json(output: str, tag: str) -> Any:
    """The JSON the script printed after ``tag`` (``BENCH_STATUS``, ``BENCH_SUMMARY``) when the
    run ended."""
    match = re.search(rf"^{tag} (.*)$", output, flags=re.M)
    if match is None:
        raise RuntimeError(f"wrk printed no {tag} line:\n{output[-1000:]}")
    return json.loads(match.group(1))
