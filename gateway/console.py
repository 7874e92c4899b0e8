"""The operator console: ``/admin/console``, a live page of where the drop stands.

The page and its data are behind the admin token, as every admin route is. A browser cannot put
a bearer token on a page load or on an ``EventSource``, so the console signs in once: the token
is posted from a form (``/admin/console/session``) and answered with a session cookie that is
an HMAC of the token's name and an expiry, keyed by the token itself (the token is never stored
in the browser; rotating a token ends its sessions). The cookie is ``HttpOnly``,
``SameSite=Strict``, scoped to ``/admin/console`` and ``Secure`` over HTTPS, and it opens the
console's two reads alone: the page and its event stream. Every route that changes anything
still takes the bearer token only, so a cookie a browser sends on its own cannot change state.
A bearer token also opens both reads (``curl`` works).

``/admin/console/events`` is a Server-Sent Events stream with one ``state`` event a second: the
whole state each time (:class:`shared.ops.watch.DropWatch`, plus what only the gateway knows:
the coupons it sheds and this host's answers by outcome), so a console that reconnects needs
nothing else. One watch per gateway process samples while at least one console is open and
stops when the last one leaves; consoles are few (at most :data:`MAX_VIEWERS` per process), so
each viewer is a plain coroutine.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import ipaddress
import re
import time
from typing import Any
from urllib.parse import urlsplit

import orjson
import structlog
from aiohttp import web

from gateway import appkeys
from gateway.admin import admin_token, bearer_admin, require_admin_path
from gateway.backpressure import PipelineHealth
from gateway.pages import Files, page_response, read
from gateway.problems import stream_headers
from shared import metrics
from shared.errors import Forbidden, InvalidRequest, Unauthorized, Unavailable
from shared.ops.watch import DropWatch

log = structlog.get_logger(__name__)

SESSION_COOKIE = "coupon_console"
SESSION_SECONDS = 12 * 3600
"""How long a console sign-in lasts."""
SAMPLE_SECONDS = 1.0
MAX_VIEWERS = 32
"""Consoles one gateway process serves at once (beyond: 503)."""
HEARTBEAT_SECONDS = 15.0
WRITE_SECONDS = 10.0
"""How long a console may leave a write unread before it is let go (its slot freed)."""
RETRY_MS = 2000
_EXPIRY = re.compile(r"[0-9]{1,12}")
_COOKIE_PATH = "/admin/console"
_HOST_OUTCOMES = ("accepted", "sold_out", "duplicate", "outside_window", "paused", "shed",
                  "unconfirmed", "unavailable", "rate_limited")  # fmt: skip
_REFUSALS = {
    "shed": "shed (the gateway's queue or the pipeline is behind)",
    "unconfirmed": "unconfirmed (a replica did not acknowledge the reservation)",
    "unavailable": "unavailable (a store did not answer)",
}

console_files = Files("pages.css", "console.js")
_CONSOLE_PAGE = read("console.html")
_LOGIN_PAGE = read("login.html")
_LOGIN_FAILED = _LOGIN_PAGE.replace(
    b'<p id="login-error" role="alert" hidden>', b'<p id="login-error" role="alert">'
)


def _signature(token: str, actor: str, expires: int) -> str:
    message = f"console\0{actor}\0{expires}".encode()
    return hmac.new(token.encode(), message, hashlib.sha256).hexdigest()


def _session_cookie(token: str, actor: str, now: float) -> str:
    expires = int(now) + SESSION_SECONDS
    name = base64.urlsafe_b64encode(actor.encode()).decode().rstrip("=")
    return f"{expires}.{name}.{_signature(token, actor, expires)}"


def _session_actor(request: web.Request) -> str | None:
    """The admin a console session cookie was signed for, while it is valid and its token is
    still configured."""
    raw = request.cookies.get(SESSION_COOKIE, "")
    expires_text, _, rest = raw.partition(".")
    name, _, signature = rest.partition(".")
    if not _EXPIRY.fullmatch(expires_text) or int(expires_text) < time.time():
        return None
    try:
        actor = base64.urlsafe_b64decode(name + "=" * (-len(name) % 4)).decode()
    except ValueError:
        return None
    found = None
    for token, token_actor_name in request.app[appkeys.SETTINGS].admin_actors.items():
        expected = _signature(token, token_actor_name, int(expires_text))
        if hmac.compare_digest(signature.encode(), expected.encode()) and token_actor_name == actor:
            found = actor
    return found


def _viewer(request: web.Request) -> str | None:
    """Who may read the console: a signed-in session, or a request with the admin token."""
    require_admin_path(request)
    return _session_actor(request) or bearer_admin(request)


def _over_https(request: web.Request) -> bool:
    """Whether the browser reached us over HTTPS: directly, or through a trusted proxy
    (``COUPON_TRUSTED_PROXIES``) that says so in ``X-Forwarded-Proto``."""
    if request.secure:
        return True
    try:
        peer = ipaddress.ip_address(request.remote or "")
    except ValueError:
        return False
    trusted = request.app[appkeys.SETTINGS].trusted_proxy_networks
    forwarded = request.headers.get("X-Forwarded-Proto", "").split(",")[-1].strip().lower()
    return forwarded == "https" and any(peer in network for network in trusted)


def _check_origin(request: web.Request) -> None:
    """A console form must come from the console's own page: a browser names the page's origin
    in ``Origin``; another host's (or an opaque ``null`` one) is refused."""
    require_admin_path(request)
    origin = request.headers.get("Origin")
    if origin is not None and (origin == "null" or urlsplit(origin).netloc != request.host):
        raise Forbidden("a console form must come from the console's own page")


def _wants_html(request: web.Request) -> bool:
    return "text/html" in request.headers.get("Accept", "")


class Console:
    """The consoles of one gateway process and the watch that feeds them."""

    def __init__(self, watch: DropWatch, health: PipelineHealth) -> None:
        self._watch = watch
        self._health = health
        self._viewers = 0
        self._frame: bytes | None = None
        self._fresh = asyncio.Event()
        self._sampler: asyncio.Task[None] | None = None
        self._closed = False
        self._outcomes: dict[str, float] | None = None
        self._outcomes_at = 0.0

    async def stream(self, request: web.Request) -> web.StreamResponse:
        if self._closed:
            raise Unavailable("the gateway is stopping")
        if self._viewers >= MAX_VIEWERS:
            raise Unavailable(f"{MAX_VIEWERS} consoles are open on this gateway process")
        response = web.StreamResponse(headers={
            **stream_headers(request),
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
        })  # fmt: skip
        response.enable_chunked_encoding()
        if request.method == "HEAD":
            await response.prepare(request)
            return response
        self._viewers += 1
        try:
            await response.prepare(request)
            await response.write(b"retry: %d\n\n" % RETRY_MS)
            await self._follow(response)
        except (ConnectionError, OSError, TimeoutError):
            pass  # the console was closed, or stopped reading
        finally:
            self._viewers -= 1
        return response

    async def close(self) -> None:
        """End every console's stream (the gateway stops; they reconnect elsewhere)."""
        self._closed = True
        self._fresh.set()
        if self._sampler is not None:
            self._sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sampler

    async def _follow(self, response: web.StreamResponse) -> None:
        if self._sampler is None or self._sampler.done():
            self._sampler = asyncio.create_task(self._sample_while_watched(), name="console")
        sent: bytes | None = None
        while not self._closed:
            fresh = self._fresh  # before the frame is read: a newer frame sets this one
            if self._frame is not None and self._frame is not sent:
                sent = self._frame
                await asyncio.wait_for(response.write(sent), WRITE_SECONDS)
            try:
                await asyncio.wait_for(fresh.wait(), HEARTBEAT_SECONDS)
            except TimeoutError:
                await asyncio.wait_for(response.write(b": keep-alive\n\n"), WRITE_SECONDS)

    async def _sample_while_watched(self) -> None:
        failing = False
        try:
            while self._viewers and not self._closed:
                started = time.monotonic()
                try:
                    state = await self._watch.sample()
                    state["warnings"] += self._shedding()
                    state["answers"] = await self._answers(state["warnings"])
                    failing = False
                except Exception:  # a console must not die of one bad sample
                    if not failing:  # once per run of failures, not once a second
                        log.exception("console_sample_failed")
                    failing = True
                    state = _FAILED_SAMPLE
                self._frame = b"event: state\ndata: %s\n\n" % orjson.dumps(state)
                fresh, self._fresh = self._fresh, asyncio.Event()
                fresh.set()
                await asyncio.sleep(max(SAMPLE_SECONDS - (time.monotonic() - started), 0.05))
        finally:
            # Nobody watches: what was sampled grows stale, and the next console starts afresh
            # (the rates over the idle hours would be meaningless, and the next read of new rows
            # would span all of them).
            self._frame = None
            self._outcomes = None
            self._watch.reset()

    def _shedding(self) -> list[dict[str, Any]]:
        return [
            {"code": "shedding", "detail": f"coupon {coupon_id}: new requests get 503: {reason}",
             "coupon_id": coupon_id}
            for coupon_id, reason in sorted(self._health.behind.items())
        ]  # fmt: skip

    async def _answers(self, warnings: list[dict[str, Any]]) -> dict[str, float]:
        """This host's issue answers per second since the last sample, by outcome; a warning
        for each kind of 503 among them."""
        totals = await asyncio.to_thread(metrics.issue_outcome_totals)
        now = time.monotonic()
        last, last_at = self._outcomes, self._outcomes_at
        self._outcomes, self._outcomes_at = totals, now
        if last is None:
            return {}
        seconds = max(now - last_at, 1e-3)
        rates = {
            outcome: round((totals.get(outcome, 0.0) - last.get(outcome, 0.0)) / seconds, 1)
            for outcome in _HOST_OUTCOMES
        }
        for outcome, meaning in _REFUSALS.items():
            if rates[outcome] > 0:
                warnings.append({
                    "code": outcome,
                    "detail": f"{rates[outcome]:g} requests a second answered 503 {meaning}"
                              " on this host's gateway processes",
                    "coupon_id": None,
                })  # fmt: skip
        return rates


_FAILED_SAMPLE: dict[str, Any] = {
    "at": None,
    "workers": None,
    "coupons": [],
    "more": 0,
    "answers": {},
    "warnings": [{
        "code": "sample_failed",
        "detail": "the console could not read the drop's state (see console_sample_failed in"
                  " the gateway's log)",
        "coupon_id": None,
    }],
}  # fmt: skip

routes = web.RouteTableDef()


@routes.get("/admin/console")
async def console_page(request: web.Request) -> web.Response:
    """The console, or (signed out) the sign-in form: as HTML for a browser, else 401."""
    if _viewer(request) is not None:
        return page_response(_CONSOLE_PAGE, "console.html")
    if _wants_html(request):
        return _sign_in_page(_LOGIN_PAGE)
    raise Unauthorized("sign in with the admin token, or send it as a bearer token")


@routes.post("/admin/console/session")
async def sign_in(request: web.Request) -> web.Response:
    """Sign a console in: the admin token from a form, answered with the session cookie."""
    _check_origin(request)
    if request.content_type != "application/x-www-form-urlencoded":
        raise InvalidRequest("send the token as a form field (application/x-www-form-urlencoded)")
    form = await request.post()
    offered = form.get("token")
    if not isinstance(offered, str) or not offered:
        raise InvalidRequest("the form must have a non-empty token field")
    found = admin_token(request, offered.strip())
    if found is None:
        if _wants_html(request):
            return _sign_in_page(_LOGIN_FAILED)
        raise Unauthorized("that is not an admin token")
    token, actor = found
    log.info("console_signed_in", actor=actor)
    response = _see_console()
    response.set_cookie(
        SESSION_COOKIE,
        _session_cookie(token, actor, time.time()),
        max_age=SESSION_SECONDS,
        path=_COOKIE_PATH,
        httponly=True,
        samesite="Strict",
        secure=_over_https(request),
    )
    return response


@routes.post("/admin/console/logout")
async def sign_out(request: web.Request) -> web.Response:
    """End the console session in this browser."""
    _check_origin(request)
    response = _see_console()
    response.del_cookie(SESSION_COOKIE, path=_COOKIE_PATH)
    return response


def _sign_in_page(body: bytes) -> web.Response:
    """The sign-in form, as the 401 a browser shows (with the challenge every 401 carries)."""
    response = page_response(body, "login.html", status=401)
    response.headers["WWW-Authenticate"] = "Bearer"
    return response


def _see_console() -> web.Response:
    return web.Response(status=303, headers={"Location": _COOKIE_PATH})


@routes.get("/admin/console/events")
async def console_events(request: web.Request) -> web.StreamResponse:
    """The console's live state, one ``state`` event a second (Server-Sent Events)."""
    if _viewer(request) is None:
        raise Unauthorized("sign in to the console, or send the admin token as a bearer token")
    return await request.app[appkeys.CONSOLE].stream(request)


routes.get("/admin/console/assets/{name}")(console_files.serve)
