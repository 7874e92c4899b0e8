"""The OpenAPI 3.1 description of every gateway route, served at ``GET /openapi.json``.

The document is a plain dict built once at import from small helpers; limits and error codes
come from the code that enforces them (``shared.coupons``, ``shared.errors``), so the two cannot
drift apart silently. ``tests/test_openapi.py`` checks the document against the app's routes and
real responses against the document.
"""

from __future__ import annotations

import importlib.metadata
import re
from collections.abc import Iterable
from typing import Any

import orjson
from aiohttp import web

from gateway.problems import PROBLEM_TYPE
from shared.errors import (
    AppError,
    Conflict,
    CouponNotFound,
    CouponPaused,
    DuplicatedIssue,
    Forbidden,
    InvalidRequest,
    IssueNotFound,
    OutsideWindow,
    RateLimited,
    Rejection,
    SoldOut,
    Unauthorized,
    Unavailable,
)
from shared.ids import MAX_ID, MAX_INT32
from shared.model import COUPON_TYPE

Json = dict[str, Any]

# Codes the problem middleware gives aiohttp's own HTTP errors (gateway/problems.py).
NOT_FOUND = "NOT_FOUND"
METHOD_NOT_ALLOWED = "METHOD_NOT_ALLOWED"

JSON = "application/json"
PROBLEM_JSON = "application/problem+json"
# Headers the errors of shared/errors.py add (AppError.headers): (name, component, statuses).
RESPONSE_HEADERS = (
    ("Retry-After", "RetryAfter", (429, 503)),
    ("WWW-Authenticate", "WwwAuthenticate", (401,)),
)


def _version() -> str:
    try:
        return importlib.metadata.version("coupon-drop")
    except importlib.metadata.PackageNotFoundError:
        return "0.0.0"


def _subclasses(base: type[AppError]) -> list[type[AppError]]:
    found = [base]
    for cls in base.__subclasses__():
        found.extend(_subclasses(cls))
    return found


def _codes(errors: Iterable[type[AppError]]) -> list[str]:
    return sorted({error.code for error in errors})


# --------------------------------------------------------------------------------------------
# helpers


def ref(kind: str, name: str) -> Json:
    return {"$ref": f"#/components/{kind}/{name}"}


def schema(name: str) -> Json:
    return ref("schemas", name)


def closed(properties: Json, *, optional: Iterable[str] = (), **extra: Any) -> Json:
    """An object with exactly ``properties``, all required except ``optional``."""
    skip = set(optional)
    return {
        "type": "object",
        "properties": properties,
        "required": [name for name in properties if name not in skip],
        "additionalProperties": False,
        **extra,
    }


def narrowed(name: str, properties: Json) -> Json:
    """The component ``name`` with some properties pinned further (a const, a smaller enum)."""
    return {"allOf": [schema(name)], "properties": properties}


def integer(low: int, high: int, *, nullable: bool = False, **extra: Any) -> Json:
    kind: str | list[str] = ["integer", "null"] if nullable else "integer"
    fmt = "int64" if high > MAX_INT32 else "int32"
    return {"type": kind, "format": fmt, "minimum": low, "maximum": high, **extra}


def response(description: str, content: Json | None = None, headers: Json | None = None) -> Json:
    """A response object; every response carries the request id the middleware sets."""
    result: Json = {
        "description": description,
        "headers": {"X-Request-ID": ref("headers", "RequestId"), **(headers or {})},
    }
    if content is not None:
        result["content"] = content
    return result


def json_body(body_schema: Json, media_type: str = JSON) -> Json:
    return {media_type: {"schema": body_schema}}


def problem(status: int, description: str, codes: Iterable[str]) -> Json:
    """A problem+json response whose ``status`` is ``status`` and ``code`` one of ``codes``."""
    body = narrowed("Problem", {"status": {"const": status}, "code": {"enum": sorted(set(codes))}})
    headers = {
        name: ref("headers", component)
        for name, component, statuses in RESPONSE_HEADERS
        if status in statuses
    }
    return response(description, json_body(body, PROBLEM_JSON), headers or None)


def errors(description: str, *classes: type[AppError]) -> Json:
    """The problem response of :class:`AppError` classes that share one HTTP status."""
    statuses = {cls.status for cls in classes}
    if len(statuses) != 1:
        raise ValueError(f"one response per status: {classes} have {sorted(statuses)}")
    return problem(statuses.pop(), description, _codes(classes))


def path_id(name: str) -> Json:
    return {
        "name": name,
        "in": "path",
        "required": True,
        "description": f"{name}: decimal digits, 1 .. 2^63-1; anything else is a 400",
        "schema": schema("Id"),
    }


def query_int(name: str, low: int, high: int, default: int, description: str) -> Json:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "description": description,
        "schema": integer(low, high, default=default),
    }


def operation(
    operation_id: str,
    summary: str,
    tag: str,
    responses: Json,
    *,
    parameters: Iterable[Json] = (),
    body: Json | None = None,
    admin: bool = False,
    identity: bool = False,
    limited: bool = False,
    description: str | None = None,
) -> Json:
    """One operation; routes that read a body may also answer 400 and 413, admin ones 401,
    and every route a 500 when something unexpected fails."""
    result: Json = {
        "operationId": operation_id,
        "summary": summary,
        "tags": [tag],
        "parameters": [ref("parameters", "RequestId"), *parameters],
    }
    if description:
        result["description"] = description
    extra: Json = {}
    if admin:
        result["security"] = [{"adminToken": []}]
        extra["401"] = ref("responses", "Unauthorized")
    if identity:
        # The user's token is required only when COUPON_AUTH=jwt: {} makes it optional here.
        result["security"] = [{}, {"userToken": []}]
        extra["401"] = ref("responses", "TokenRejected")
        extra["403"] = ref("responses", "Forbidden")
    if limited:
        extra["429"] = ref("responses", "RateLimited")
    if body is not None:
        result["requestBody"] = {"required": True, "content": json_body(body)}
        extra["400"] = ref("responses", "InvalidRequest")
        extra["413"] = ref("responses", "TooLarge")
    result["responses"] = dict(
        sorted({**extra, **responses, "500": ref("responses", "InternalError")}.items())
    )
    return result


# --------------------------------------------------------------------------------------------
# components

TIMESTAMP = {"type": "string", "format": "date-time", "description": "ISO-8601 with an offset"}
COUNT = integer(0, MAX_ID)
QUANTITY = integer(0, MAX_INT32)
TITLE = {"type": "string", "minLength": 1, "maxLength": 255, "pattern": r"\S"}
SEED_COMMENTS = sorted({cls.seed_message for cls in _subclasses(Rejection)})

COUPON_FIELDS: Json = {
    "id": schema("Id"),
    "title": {"type": "string"},
    "coupon_type": {"const": COUPON_TYPE},
    "total_quantity": integer(0, MAX_INT32, nullable=True, description="null: unlimited"),
    "discount_amount": QUANTITY,
    "min_available_amount": QUANTITY,
    "date_issue_start": TIMESTAMP,
    "date_issue_end": {**TIMESTAMP, "description": "exclusive; ISO-8601 with an offset"},
    "paused": {"type": "boolean"},
}

COUNTER_FIELDS: Json = {
    "requested": {**COUNT, "description": "requests accepted into the stream, ever"},
    "issued": {**COUNT, "description": "coupon_issues rows"},
    "issued_quantity": {**COUNT, "description": "coupons.issued_quantity in MySQL"},
    "pending": {**COUNT, "description": "accepted, not yet committed"},
    "dead_lettered": {**COUNT, "description": "given up on; their slots were released"},
    "remaining": integer(0, MAX_INT32, nullable=True, description="null: unlimited"),
    "reserved": {**COUNT, "description": "users holding a stock slot in Redis"},
}

SCHEMAS: Json = {
    "Id": integer(1, MAX_ID, description="a positive 64-bit id"),
    "Problem": closed(
        {
            "type": {
                "type": "string",
                "format": "uri",
                "pattern": "^" + re.escape(PROBLEM_TYPE),
            },
            "title": {"type": "string"},
            "status": {"type": "integer", "minimum": 400, "maximum": 599},
            "detail": {"type": "string"},
            "code": {
                "type": "string",
                "enum": sorted({*_codes(_subclasses(AppError)), NOT_FOUND, METHOD_NOT_ALLOWED}),
            },
        },
        description="RFC 9457 problem details; ``code`` is machine-readable",
    ),
    "IssueRequest": {
        "type": "object",
        "properties": {"user_id": schema("Id")},
        "required": ["user_id"],
        "description": (
            "other members are ignored; with COUPON_AUTH=jwt user_id may be left out (the"
            " token's sub is the user) and, when present, must equal sub (else 403)"
        ),
    },
    "IssueAccepted": closed(
        {
            "coupon_id": schema("Id"),
            "user_id": schema("Id"),
            "status": {"const": "accepted"},
            "request_id": {"type": "string", "description": "the stream entry id"},
        }
    ),
    "IssueStatus": closed(
        {
            "coupon_id": schema("Id"),
            "user_id": schema("Id"),
            "status": {"enum": ["pending", "issued", "failed"]},
        }
    ),
    "Coupon": closed(COUPON_FIELDS),
    "CouponSnapshot": closed(
        {
            **COUPON_FIELDS,
            "remaining": integer(0, MAX_INT32, nullable=True, description="null: unlimited"),
            "sold_out": {"type": "boolean"},
        }
    ),
    "CouponListItem": closed({**COUPON_FIELDS, "issued_quantity": COUNT}),
    "CouponPage": closed(
        {
            "coupons": {"type": "array", "items": schema("CouponListItem")},
            "next_after": {
                "oneOf": [schema("Id"), {"type": "null"}],
                "description": "pass as ?after= for the next page; null on the last page",
            },
        }
    ),
    "CouponWithCounters": closed({**COUPON_FIELDS, **COUNTER_FIELDS}),
    "NewCoupon": {
        "type": "object",
        "properties": {
            "title": TITLE,
            "total_quantity": integer(
                0, MAX_INT32, nullable=True, default=None, description="null or absent: unlimited"
            ),
            "discount_amount": {**QUANTITY, "default": 0},
            "min_available_amount": {**QUANTITY, "default": 0},
            "date_issue_start": TIMESTAMP,
            "date_issue_end": {**TIMESTAMP, "description": "after date_issue_start; exclusive"},
        },
        "required": ["title", "date_issue_start", "date_issue_end"],
        "description": "other members are ignored",
    },
    "CouponChange": {
        "type": "object",
        "properties": {
            "title": TITLE,
            "total_quantity": integer(
                0,
                MAX_INT32,
                nullable=True,
                description="null: unlimited; 409 when below the requests already accepted",
            ),
            "date_issue_start": TIMESTAMP,
            "date_issue_end": TIMESTAMP,
            "paused": {"type": "boolean", "description": "true pauses issuing, false resumes"},
        },
        "minProperties": 1,
        "additionalProperties": False,
        "description": "only the members present change; the window must stay start < end",
    },
    "SeedIssueRequest": {
        "type": "object",
        "properties": {"userId": schema("Id"), "couponId": schema("Id")},
        "required": ["userId", "couponId"],
        "description": (
            "the seed's body; other members are ignored; with COUPON_AUTH=jwt userId may be"
            " left out and, when present, must equal the token's sub (else 403)"
        ),
    },
    "SeedResult": {
        "oneOf": [
            closed({"isSuccess": {"const": True}}),
            closed(
                {
                    "isSuccess": {"const": False},
                    "comment": {"enum": SEED_COMMENTS, "description": "the seed's message"},
                }
            ),
        ],
    },
    "Health": closed({"status": {"const": "ok"}}),
    "Readiness": closed(
        {
            "ready": {"type": "boolean"},
            "redis": {
                "enum": ["ok", "state_lost", "unreachable"],
                "description": "state_lost: run couponctl rebuild",
            },
            "mysql": {"enum": ["ok", "unreachable"]},
        }
    ),
}

RESPONSES: Json = {
    "InvalidRequest": errors("Malformed input (path, query or body)", InvalidRequest),
    "Unauthorized": errors("Missing or wrong admin bearer token", Unauthorized),
    "TokenRejected": errors(
        "COUPON_AUTH=jwt: the user's token is missing, malformed, expired or does not verify",
        Unauthorized,
    ),
    "Forbidden": errors("COUPON_AUTH=jwt: the token is not the named user's", Forbidden),
    "RateLimited": errors(
        "Too many issue requests from this address or for this user; nothing was reserved",
        RateLimited,
    ),
    "TooLarge": problem(
        413, "The body is larger than COUPON_MAX_BODY_BYTES", [InvalidRequest.code]
    ),
    "Unavailable": errors("Cannot answer safely now; retry after Retry-After", Unavailable),
    "InternalError": problem(500, "Unexpected error (logged)", _codes([AppError])),
    "NotFound": problem(404, "Any path not listed in this document", [NOT_FOUND]),
    "MethodNotAllowed": problem(
        405, "A method not listed for a path of this document", [METHOD_NOT_ALLOWED]
    ),
}

COMPONENTS: Json = {
    "schemas": SCHEMAS,
    "responses": RESPONSES,
    "parameters": {
        "RequestId": {
            "name": "X-Request-ID",
            "in": "header",
            "required": False,
            "description": "echoed back (first 128 characters); generated when absent",
            "schema": {"type": "string"},
        },
    },
    "headers": {
        "RequestId": {
            "description": "the request id of the access log line",
            "required": True,
            "schema": {"type": "string", "maxLength": 128},
        },
        "WwwAuthenticate": {
            "description": "the RFC 6750 challenge: which scheme applies",
            "required": True,
            "schema": {"type": "string", "pattern": "^Bearer"},
        },
        "RetryAfter": {
            "description": "seconds to wait before retrying",
            "required": True,
            "schema": {"type": "integer", "minimum": 0},
        },
    },
    "securitySchemes": {
        "adminToken": {
            "type": "http",
            "scheme": "bearer",
            "description": "COUPON_ADMIN_TOKEN; unset refuses every admin call",
        },
        "userToken": {
            "type": "http",
            "scheme": "bearer",
            "bearerFormat": "JWT",
            "description": (
                "COUPON_AUTH=jwt: a JWT whose sub is the user id (1 .. 2^63-1 in decimal), signed"
                " with the configured algorithm, with exp; not used when COUPON_AUTH=none"
            ),
        },
    },
}

# --------------------------------------------------------------------------------------------
# paths

COUPON_ID = path_id("coupon_id")
UNAVAILABLE = ref("responses", "Unavailable")
INVALID = ref("responses", "InvalidRequest")
NO_COUPON = errors("No such coupon", CouponNotFound)
SEED_RESULT = response(
    "Accepted (true), or a business rejection with the seed's message (false)",
    json_body(schema("SeedResult")),
)


def seed_issue(operation_id: str, summary: str) -> Json:
    return {
        "post": operation(
            operation_id,
            summary,
            "seed",
            {"200": SEED_RESULT, "503": UNAVAILABLE},
            body=schema("SeedIssueRequest"),
            identity=True,
            limited=True,
        )
    }


def text(description: str, media_types: Iterable[str], body: Json) -> Json:
    return response(description, {media: {"schema": body} for media in media_types})


PATHS: Json = {
    "/v1/coupons/{coupon_id}/issues": {
        "post": operation(
            "issueCoupon",
            "Reserve the coupon for a user",
            "public",
            {
                "202": response(
                    "Reserved and durably queued; the row follows",
                    json_body(schema("IssueAccepted")),
                ),
                "404": NO_COUPON,
                "409": errors(
                    "Duplicate, sold out, outside the window, or paused",
                    DuplicatedIssue,
                    SoldOut,
                    OutsideWindow,
                    CouponPaused,
                ),
                "503": UNAVAILABLE,
            },
            parameters=[COUPON_ID],
            body=schema("IssueRequest"),
            identity=True,
            limited=True,
        )
    },
    "/v1/coupons/{coupon_id}/issues/{user_id}": {
        "get": operation(
            "getIssueStatus",
            "Where a user's request stands: pending, issued or failed",
            "public",
            {
                "200": response("The request's status", json_body(schema("IssueStatus"))),
                "400": INVALID,
                "404": errors("No such coupon, or never requested", CouponNotFound, IssueNotFound),
                "503": UNAVAILABLE,
            },
            parameters=[COUPON_ID, path_id("user_id")],
            identity=True,
        )
    },
    "/v1/coupons/{coupon_id}": {
        "get": operation(
            "getCoupon",
            "The public snapshot: title, window, total, remaining, sold_out",
            "public",
            {
                "200": response("The snapshot", json_body(schema("CouponSnapshot"))),
                "400": INVALID,
                "404": NO_COUPON,
                "503": UNAVAILABLE,
            },
            parameters=[COUPON_ID],
        )
    },
    "/v1/issue": seed_issue(
        "seedIssue", "The seed's synchronous issue: the row is committed before the answer"
    ),
    "/v1/issue-async": seed_issue("seedIssueAsync", "The seed's async issue (native path)"),
    "/v2/issue-async": seed_issue("seedIssueAsyncV2", "The seed's async issue (native path)"),
    "/hello": {
        "get": operation(
            "hello",
            "The seed's baseline endpoint",
            "seed",
            {"200": text("hello!", ["text/plain"], {"const": "hello!"})},
        )
    },
    "/admin/coupons": {
        "post": operation(
            "createCoupon",
            "Create a coupon, ready to issue",
            "admin",
            {
                "201": response("Created in MySQL and Redis", json_body(schema("Coupon"))),
                "503": UNAVAILABLE,
            },
            body=schema("NewCoupon"),
            admin=True,
        ),
        "get": operation(
            "listCoupons",
            "Coupons in id order, a page at a time",
            "admin",
            {
                "200": response("One page", json_body(schema("CouponPage"))),
                "400": INVALID,
            },
            parameters=[
                query_int("after", 0, MAX_ID, 0, "the last id of the previous page"),
                query_int("limit", 1, 1000, 100, "page size"),
            ],
            admin=True,
        ),
    },
    "/admin/coupons/{coupon_id}": {
        "get": operation(
            "showCoupon",
            "The coupon plus its counters",
            "admin",
            {
                "200": response(
                    "The coupon and where its requests stand",
                    json_body(schema("CouponWithCounters")),
                ),
                "400": INVALID,
                "404": NO_COUPON,
                "503": UNAVAILABLE,
            },
            parameters=[COUPON_ID],
            admin=True,
        ),
        "patch": operation(
            "updateCoupon",
            "Move the window, change the stock, pause or resume",
            "admin",
            {
                "200": response("The coupon as changed", json_body(schema("Coupon"))),
                "404": NO_COUPON,
                "409": errors("Stock below the requests already accepted", Conflict),
                "503": UNAVAILABLE,
            },
            parameters=[COUPON_ID],
            body=schema("CouponChange"),
            admin=True,
        ),
    },
    "/healthz": {
        "get": operation(
            "healthz",
            "The process is alive",
            "operations",
            {"200": response("Alive", json_body(schema("Health")))},
        )
    },
    "/readyz": {
        "get": operation(
            "readyz",
            "Redis and MySQL both answer",
            "operations",
            {
                "200": response(
                    "Ready",
                    json_body(
                        narrowed(
                            "Readiness",
                            {
                                "ready": {"const": True},
                                "redis": {"const": "ok"},
                                "mysql": {"const": "ok"},
                            },
                        )
                    ),
                ),
                "503": response(
                    "A store does not answer",
                    json_body(narrowed("Readiness", {"ready": {"const": False}})),
                ),
            },
        )
    },
    "/metrics": {
        "get": operation(
            "metrics",
            "Prometheus metrics",
            "operations",
            {
                "200": text(
                    "Prometheus text format; OpenMetrics when the Accept header asks for it",
                    ["text/plain", "application/openmetrics-text"],
                    {"type": "string"},
                )
            },
        )
    },
    "/openapi.json": {
        "get": operation(
            "openapi",
            "This document",
            "operations",
            {
                "200": response(
                    "OpenAPI 3.1",
                    json_body({"type": "object", "required": ["openapi", "info", "paths"]}),
                )
            },
        )
    },
}

DOCUMENT: Json = {
    "openapi": "3.1.0",
    "info": {
        "title": "Coupon drop gateway",
        "version": _version(),
        "description": (
            "First-come-first-served coupon drops. Errors are application/problem+json."
            " A path not listed here answers 404 (components.responses.NotFound), a method"
            " not listed for a path 405 (components.responses.MethodNotAllowed). Every GET"
            " also answers HEAD."
        ),
    },
    "tags": [
        {"name": "public", "description": "Native issue, status and snapshot routes"},
        {"name": "seed", "description": "The original system's routes and shapes"},
        {
            "name": "admin",
            "description": (
                "Coupon administration (bearer token); with COUPON_ADMIN_PORT set, served only"
                " on that listener (the public one answers 404)"
            ),
        },
        {"name": "operations", "description": "Health, readiness, metrics, this document"},
    ],
    "paths": PATHS,
    "components": COMPONENTS,
}

_BODY = orjson.dumps(DOCUMENT)


async def openapi_json(request: web.Request) -> web.Response:
    """The OpenAPI document, serialised once at import."""
    return web.Response(body=_BODY, content_type=JSON)
