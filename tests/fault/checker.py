"""The checker: what the clients saw (a :class:`~tests.fault.load.History`) against what MySQL
and Redis hold once the system drained: the invariants I1–I7 listed below.

It reads the stores through :meth:`tests.invariants.Checker.snapshot` and judges every user by
the strongest answer they got (ok > unknown > fail):

- I1 no more rows than ``total_quantity``; I2 one row per user (the snapshot asserts it);
- I3 ok ⊆ rows ∪ dead-lettered-and-shown-failed (a lost ok is reported by user);
- I4 rows ⊆ ok ∪ unknown: a row for a user who only got definite rejections, or never asked;
- I5 the stream accounts for every entry: entries added = rows + pending + dead letters;
- I6 ``issued_quantity`` = rows; drained: nothing pending, Redis's sets agree with MySQL;
- I7 (given the window) every row's acceptance time lies inside it;
- and no crossed answers: a 202 names the request's user, and the row carries the entry id
  the client was given.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime

from shared import keys
from shared.model import Coupon
from tests.fault.harness import Stack
from tests.fault.load import History, Kind
from tests.invariants import Checker, Snapshot


@dataclass
class Verdict:
    """The numbers of one check, and what was violated."""

    requests: int
    ok: int
    fail: int
    unknown: int
    not_sent: int
    rows: int
    dead: int
    lost: list[int]
    snapshot: Snapshot
    violations: list[str] = field(default_factory=list)

    def line(self, scenario: str, **extra: object) -> str:
        """The one-line measurement every fault test prints."""
        parts = [
            f"requests={self.requests}",
            f"ok={self.ok}",
            f"fail={self.fail}",
            f"unknown={self.unknown}",
            f"not_sent={self.not_sent}",
            f"rows={self.rows}",
            f"dead={self.dead}",
            f"lost={len(self.lost)}",
        ]
        for key, value in extra.items():
            parts.append(f"{key}={value:.2f}s" if isinstance(value, float) else f"{key}={value}")
        return f"{scenario}: " + " ".join(parts)


async def check(
    stack: Stack,
    coupon: Coupon,
    history: History,
    *,
    tolerate_lost: bool = False,
    stream_accounting: bool = True,
    window: tuple[datetime, datetime] | None = None,
) -> Verdict:
    """Check a drained coupon against the answers; ``violations`` lists what broke.

    ``tolerate_lost`` reports lost oks instead of flagging them (``appendfsync everysec``);
    ``stream_accounting`` off skips I5 and the entry-id check when the stream itself was lost
    (Redis state loss); ``window`` adds I7 on the rows' acceptance times.
    """
    async with stack.mysql() as pool:
        snap = await Checker(pool, stack.redis).snapshot(coupon.id)
    answers = history.of(coupon.id)
    ok, unknown, fail_only = history.partition(coupon.id)
    rows = set(snap.rows)
    failed_shown = snap.marked_failed & snap.dead_users
    lost = sorted(ok - rows - failed_shown)
    verdict = Verdict(
        requests=len(answers),
        ok=sum(a.kind is Kind.OK for a in answers),
        fail=sum(a.kind is Kind.FAIL for a in answers),
        unknown=sum(a.kind is Kind.UNKNOWN for a in answers),
        not_sent=history.not_sent,
        rows=len(rows),
        dead=snap.dead_lettered,
        lost=lost,
        snapshot=snap,
    )
    v = verdict.violations
    if coupon.total_quantity is not None and len(rows) > coupon.total_quantity:
        v.append(f"I1 oversold: {len(rows)} rows > total {coupon.total_quantity}")
    if lost and not tolerate_lost:
        v.append(f"I3 {len(lost)} oks neither issued nor failed: {lost[:10]}")
    unexplained = rows - ok - unknown
    if unexplained:
        refused = sorted(unexplained & fail_only)[:10]
        never_asked = sorted(unexplained - fail_only)[:10]
        v.append(
            f"I4 {len(unexplained)} rows without an ok or unknown answer"
            f" (definitely refused: {refused}, never asked: {never_asked})"
        )
    if stream_accounting:
        async_rows = sum(1 for request in snap.rows.values() if request is not None)
        placed = async_rows + snap.pending + snap.dead_lettered + snap.correction
        if snap.requested != placed:
            v.append(
                f"I5 entries={snap.requested} != rows {async_rows} + pending {snap.pending}"
                f" + dead {snap.dead_lettered} + correction {snap.correction}"
            )
    if snap.issued_quantity != len(rows):
        v.append(f"I6 issued_quantity={snap.issued_quantity} but {len(rows)} rows")
    if snap.pending:
        v.append(f"I8 not drained: {snap.pending} entries pending")
    if snap.slot_holders != rows:
        v.append(
            f"slots differ from rows: {len(snap.slot_holders - rows)} slots without a row"
            f" {sorted(snap.slot_holders - rows)[:10]}, {len(rows - snap.slot_holders)} rows"
            f" without a slot {sorted(rows - snap.slot_holders)[:10]}"
        )
    if snap.marked_issued != rows:
        v.append(f"issued marks differ from rows: {len(snap.marked_issued ^ rows)} users")
    if snap.marked_failed & snap.slot_holders:
        v.append("a user shown failed still holds a slot")
    v.extend(_crossed(history, coupon.id, snap))
    if stream_accounting:
        v.extend(await _entries_match(stack, coupon.id, history))
    if window is not None:
        v.extend(await _outside_window(stack, coupon.id, window))
    return verdict


def _crossed(history: History, coupon_id: int, snap: Snapshot) -> list[str]:
    problems = []
    crossed = [a for a in history.of(coupon_id) if a.crossed]
    if crossed:
        problems.append(f"{len(crossed)} answers name another request: {crossed[:3]}")
    promised: dict[int, set[str]] = {}
    for answer in history.of(coupon_id):
        if answer.kind is Kind.OK:
            promised.setdefault(answer.user_id, set())
            if answer.request_id is not None:
                promised[answer.user_id].add(answer.request_id)
    twice = sorted(user for user, ids in promised.items() if len(ids) > 1)
    # A second 202 is legitimate only after the first request was dead-lettered.
    resold = [
        user for user in twice if user not in snap.marked_failed and user not in snap.dead_users
    ]
    if resold:
        problems.append(f"users accepted twice without a dead letter: {resold[:10]}")
    mismatched = sorted(
        user
        for user, request in snap.rows.items()
        if request is not None and promised.get(user) and request not in promised[user]
    )
    if mismatched:
        problems.append(f"rows carry another entry id than the client got: {mismatched[:10]}")
    return problems


async def _entries_match(stack: Stack, coupon_id: int, history: History) -> list[str]:
    """Each 202's request id is a stream entry of that very user: no reply went to another
    request (a reply read off a reused connection after a timeout would show here)."""
    promised = [
        (a.user_id, a.request_id)
        for a in history.of(coupon_id)
        if a.kind is Kind.OK and a.request_id
    ]
    if not promised:
        return []
    stream = keys.CouponKeys(coupon_id).requests
    async with stack.redis.pipeline(transaction=False) as pipe:
        for _, request_id in promised:
            pipe.xrange(stream, min=request_id, max=request_id)
        entries = await pipe.execute()
    wrong = [
        (user, request_id, found[0][1] if found else None)
        for (user, request_id), found in zip(promised, entries, strict=True)
        if not found or found[0][1].get("u") != str(user)
    ]
    if wrong:
        return [f"{len(wrong)} 202s name an entry of another user (or none): {wrong[:5]}"]
    return []


async def _outside_window(
    stack: Stack, coupon_id: int, window: tuple[datetime, datetime]
) -> list[str]:
    start, end = (moment.astimezone(UTC).replace(tzinfo=None) for moment in window)
    rows = await stack.sql(
        "SELECT user_id, date_issued FROM coupon_issues WHERE coupon_id = %s", (coupon_id,)
    )
    outside = [(int(user), issued) for user, issued in rows if not start <= issued < end]
    if outside:
        return [f"I7 rows accepted outside [{start}, {end}): {outside[:5]}"]
    return []
