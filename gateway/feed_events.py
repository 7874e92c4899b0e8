"""What the live feed says: a coupon's public state, and the events between two states.

Every event carries the coupon's whole public view (the snapshot route's body plus ``phase``),
so a client may take any event as the new state; the event's name says what changed. The
event id is the state itself, encoded (:attr:`FeedState.cursor`): any gateway process, on any
host, can resume a client from its ``Last-Event-ID`` with the events that lead from that state
to the current one (:func:`transitions`), and the live stream is made by the same function,
from each subscriber's last state to the newest. No event log is kept anywhere, so resuming
costs nothing and works after a restart. What a client cannot learn is a change that was undone
while it was away (sold out, then a slot released): it hears the net change.
"""

from __future__ import annotations

import dataclasses
import re
import zlib
from dataclasses import dataclass
from typing import Any, Literal

import orjson

from shared.model import Coupon

Phase = Literal["upcoming", "open", "closed"]
_PHASE_LETTERS: dict[str, Phase] = {"u": "upcoming", "o": "open", "c": "closed"}
_CURSOR = re.compile(r"([0-9a-f]{8})\.([uoc])\.([01])\.(u|\d{1,19})\.(u|\d{1,19})")


@dataclass(frozen=True, slots=True)
class FeedState:
    """A coupon's public state at one moment, as the feed tells it."""

    fixed: dict[str, Any] = dataclasses.field(compare=False, hash=False)
    """The public fields that no event is named after (title, window, amounts): a change of
    any of them is sent as a new ``snapshot``."""
    digest: str
    """crc32 of :attr:`fixed`, which the cursor carries instead of the fields themselves."""
    phase: Phase
    paused: bool
    total: int | None
    remaining: int | None

    @classmethod
    def of(cls, coupon: Coupon, reserved: int, now_ms: int) -> FeedState:
        """The state of ``coupon`` with ``reserved`` slots held, at Redis time ``now_ms``."""
        fixed = coupon.public()
        del fixed["paused"], fixed["total_quantity"]
        total = coupon.total_quantity
        phase: Phase = coupon.phase_at(now_ms)
        return cls(
            fixed=fixed,
            digest=f"{zlib.crc32(orjson.dumps(fixed, option=orjson.OPT_SORT_KEYS)):08x}",
            phase=phase,
            paused=coupon.paused,
            total=total,
            remaining=None if total is None else max(total - reserved, 0),
        )

    @property
    def cursor(self) -> str:
        """The event id: everything :func:`transitions` needs to know of the state."""
        return ".".join((
            self.digest, self.phase[0], "1" if self.paused else "0",
            _number(self.total), _number(self.remaining),
        ))  # fmt: skip

    @property
    def told(self) -> Cursor:
        """What a client told this state knows of it (its cursor, not parsed back from text)."""
        return Cursor(self.digest, self.phase, self.paused, self.total, self.remaining)

    def view(self) -> dict[str, Any]:
        """The event's data: the snapshot route's body, plus the phase."""
        return {
            **self.fixed,
            "total_quantity": self.total,
            "paused": self.paused,
            "remaining": self.remaining,
            "sold_out": self.remaining == 0,
            "phase": self.phase,
        }


@dataclass(frozen=True, slots=True)
class Cursor:
    """A state as a client last heard it: decoded from its ``Last-Event-ID``."""

    digest: str
    phase: Phase
    paused: bool
    total: int | None
    remaining: int | None

    @classmethod
    def parse(cls, raw: str | None) -> Cursor | None:
        """The cursor, or None for a missing or unreadable id (the client starts afresh)."""
        match = _CURSOR.fullmatch(raw.strip()) if raw is not None and len(raw) <= 64 else None
        if match is None:
            return None
        digest, phase, paused, total, remaining = match.groups()
        return cls(
            digest, _PHASE_LETTERS[phase], paused == "1", _int(total), _int(remaining)
        )


def transitions(since: Cursor | None, state: FeedState) -> list[tuple[str, FeedState]]:
    """The events that take a client from ``since`` (None: it knows nothing) to ``state``,
    each with the state it leaves the client in. The window comes first, then the phase, the
    pause, the stock; a step of each kind at most (the feed coalesces)."""
    if since is None:
        return [("snapshot", state)]
    step = dataclasses.replace(
        state, phase=since.phase, paused=since.paused, total=since.total,
        remaining=since.remaining,
    )  # fmt: skip
    events: list[tuple[str, FeedState]] = []
    if since.digest != state.digest:
        # A new window or title. Going back to "upcoming" only happens this way: it has no
        # event of its own.
        if state.phase == "upcoming":
            step = dataclasses.replace(step, phase="upcoming")
        events.append(("snapshot", step))
    if step.phase != state.phase and state.phase == "upcoming":
        # Back before the start with the same window: Redis's clock stepped back.
        step = dataclasses.replace(step, phase="upcoming")
        events.append(("snapshot", step))
    if step.phase != state.phase:
        if step.phase != "open":
            step = dataclasses.replace(step, phase="open")
            events.append(("started", step))
        if state.phase == "closed":
            step = dataclasses.replace(step, phase="closed")
            events.append(("closed", step))
    if step.paused != state.paused:
        step = dataclasses.replace(step, paused=state.paused)
        events.append(("paused" if state.paused else "resumed", step))
    if (step.total, step.remaining) != (state.total, state.remaining):
        if state.remaining == 0:
            name = "sold_out"
        elif step.remaining == 0:
            name = "reopened"
        else:
            name = "remaining"
        events.append((name, state))
    return events


def frame(name: str, state: FeedState) -> bytes:
    """One Server-Sent Events message."""
    return b"event: %s\nid: %s\ndata: %s\n\n" % (
        name.encode(), state.cursor.encode(), orjson.dumps(state.view())
    )


def _number(value: int | None) -> str:
    return "u" if value is None else str(value)


def _int(text: str) -> int | None:
    return None if text == "u" else int(text)
