"""Who an issue request acts for: the verified identity, checked against the user it names.

``COUPON_AUTH=none`` (local runs and the seed's load tests) trusts the user id in the body, as
the seed did. ``COUPON_AUTH=jwt`` takes the user from the ``sub`` of an
``Authorization: Bearer <JWT>`` token, verified with PyJWT under the ONE algorithm the
configuration names (HS256 with a secret, or RS256/ES256 with a public key), so a token cannot
pick its own algorithm (``alg: none``, RS/HS confusion). ``exp`` is required; ``aud`` and
``iss`` are checked when configured. In jwt mode the body's user id may be left out (the
token says who it is); when present it must equal ``sub``, else 403.

:func:`issuing_user` is the single gate every issue route passes before anything is reserved:
the per-client-address limit, then the identity, then the per-user limit.
"""

from __future__ import annotations

import time
from typing import Any

import jwt
from aiohttp import web

from gateway import appkeys
from shared.errors import Forbidden, InvalidRequest, Unauthorized
from shared.ids import MAX_ID, canonical_id, json_id
from shared.settings import ConfigError, Settings, load_jwt_public_key

REALM = "coupon-drop"
_CHALLENGE = f'Bearer realm="{REALM}"'

# What a client is told for each way a token can fail; the RFC 6750 error code is always
# "invalid_token". Details stay generic enough to reveal nothing about the key.
_TOKEN_FAILURES: tuple[tuple[type[jwt.PyJWTError], str], ...] = (
    (jwt.ExpiredSignatureError, "the token has expired"),
    (jwt.ImmatureSignatureError, "the token is not valid yet"),
    (jwt.InvalidAudienceError, "the token is not meant for this service (aud)"),
    (jwt.InvalidIssuerError, "the token's issuer is not trusted (iss)"),
    (jwt.InvalidAlgorithmError, "the token's algorithm is not accepted"),
    (jwt.MissingRequiredClaimError, "the token lacks a required claim (exp, sub, aud or iss)"),
    (jwt.InvalidSignatureError, "the token's signature does not verify"),
)


class Authenticator:
    """Verifies bearer tokens (jwt mode) and decides the user a request acts for."""

    def __init__(self, settings: Settings) -> None:
        self.mode = settings.auth
        self._algorithms = [settings.jwt_algorithm]
        self._audience = settings.jwt_audience
        self._issuer = settings.jwt_issuer
        self._leeway = settings.jwt_leeway_seconds
        self._max_lifetime = settings.jwt_max_lifetime_seconds
        required = ["exp", "sub"]
        required += ["aud"] if settings.jwt_audience is not None else []
        required += ["iss"] if settings.jwt_issuer is not None else []
        self._options: Any = {"require": required}
        self._key: Any = None
        if self.mode == "jwt":
            if settings.jwt_secret is not None:
                self._key = settings.jwt_secret.encode()
            elif settings.jwt_public_key is not None:
                # Parsed once here: PyJWT would otherwise parse the PEM on every request.
                self._key = load_jwt_public_key(settings.jwt_public_key, settings.jwt_algorithm)
            else:  # Settings already refuses this; never verify against an empty key
                raise ConfigError("COUPON_AUTH=jwt needs COUPON_JWT_SECRET or _PUBLIC_KEY")

    def user_for(self, request: web.Request, claimed: int | None, field: str) -> int:
        """The user the request may act for; ``claimed`` is the body's id (None if absent)."""
        if self.mode == "none":
            if claimed is None:
                raise InvalidRequest(f"{field} must be an integer between 1 and {MAX_ID}")
            return claimed
        subject = self.subject(request)
        if claimed is not None and claimed != subject:
            raise Forbidden(f"the token is for user {subject}, the request names user {claimed}")
        return subject

    def check_user(self, request: web.Request, user_id: int) -> None:
        """For routes that name a user in the path: in jwt mode only that user's token may ask."""
        if self.mode == "jwt" and self.subject(request) != user_id:
            raise Forbidden(f"the token is not for user {user_id}")

    def subject(self, request: web.Request) -> int:
        """The verified ``sub`` of the request's bearer token as a user id; 401 otherwise."""
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise Unauthorized(
                "a bearer token is required: Authorization: Bearer <JWT>", challenge=_CHALLENGE
            )
        try:
            claims = jwt.decode(
                token,
                self._key,
                algorithms=self._algorithms,
                options=self._options,
                audience=self._audience,
                issuer=self._issuer,
                leeway=self._leeway,
            )
        except (jwt.PyJWTError, ValueError, TypeError) as exc:
            raise _invalid_token(_describe(exc)) from None
        # A stolen token must not work for ever: refuse one that expires too far ahead.
        if float(claims["exp"]) - time.time() > self._max_lifetime + self._leeway:
            raise _invalid_token("the token expires later than this service allows")
        subject = claims.get("sub")
        # A canonical decimal id only: "042", "+42" or " 42" would name the same user twice.
        user_id = canonical_id(subject) if isinstance(subject, str) else None
        if user_id is None:
            raise _invalid_token("the token's sub is not a user id (1 .. 2^63-1, in decimal)")
        return user_id


def _describe(error: Exception) -> str:
    for kind, detail in _TOKEN_FAILURES:
        if isinstance(error, kind):
            return detail
    return "the token is malformed or does not verify"


def _invalid_token(detail: str) -> Unauthorized:
    # error_description is a quoted-string: the details above contain no quote or backslash.
    challenge = f'{_CHALLENGE}, error="invalid_token", error_description="{detail}"'
    return Unauthorized(detail, challenge=challenge)


def claimed_user(body: dict[str, Any], field: str) -> int | None:
    """The user id a body names, or None when it names none (absent or null)."""
    value: object = body.get(field)
    return None if value is None else json_id(value, field)


def issuing_user(request: web.Request, body: dict[str, Any], field: str) -> int:
    """The gate of every issue route, in cost order, before anything is reserved: the client
    address's rate limit (429), the identity (401/403; 400 when no user is named in none mode),
    then the user's rate limit (429)."""
    limits = request.app[appkeys.LIMITS]
    limits.check_client(request)
    user_id = request.app[appkeys.AUTHENTICATOR].user_for(request, claimed_user(body, field), field)
    limits.check_user(user_id)
    return user_id


def check_user(request: web.Request, user_id: int) -> None:
    """In jwt mode, refuse a request about ``user_id`` unless its token is that user's."""
    request.app[appkeys.AUTHENTICATOR].check_user(request, user_id)
