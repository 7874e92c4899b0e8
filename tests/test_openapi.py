"""The OpenAPI document served at ``GET /openapi.json`` (gateway/openapi.json, loaded by
gateway/openapi.py).

Covers: the document is valid OpenAPI 3.1 and the file is canonical JSON; it lists exactly the
routes the apps register (the public app and the admin listener's, in every arrangement of
``COUPON_ADMIN_PORT``; no undocumented route, no stale operation); its version, problem codes,
statuses and headers, seed comments, numeric limits, coupon type and setting names are those of
the code that enforces them; and real responses of every route (success and error cases, 503s
while Redis is paused) match it: status documented, content type documented, required headers
present, body valid against the documented schema (JSON Schema 2020-12, ``$ref``s resolved in
the whole document).

Changing the API: the document is data, written by hand. Change the validator (or route, or
error class) and gateway/openapi.json in the same change; these tests say which half is behind,
naming the route, code, status or limit that differs. Keep the file as
``orjson.dumps(document, option=orjson.OPT_INDENT_2)`` plus a newline (2-space indent, keys in
the order written); its ``info.version`` stays ``0.0.0``, the served one is the package's.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import importlib.resources
import inspect
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any

import aiomysql
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, make_mocked_request
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate
from redis.asyncio import Redis
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from gateway import openapi, problems
from gateway.app import create_admin_app, create_app
from shared import errors, ids
from shared.coupon_requests import TITLE_MAX_LENGTH, CouponChange, NewCoupon
from shared.ids import MAX_ID, MAX_INT32
from shared.model import COUPON_TYPE
from shared.settings import ENVIRONMENT, Settings
from tests.conftest import ADMIN_TOKEN, CouponFactory
from tests.helpers import ADMIN, drain
from tests.invariants import Checker

Client = TestClient[Any, Any]

DOC = openapi.DOCUMENT
BASE = "urn:coupon-drop:openapi"
REGISTRY: Registry[Any] = Registry().with_resource(
    BASE, Resource.from_contents(DOC, default_specification=DRAFT202012)
)
METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
# Longer than the gateway's 0.5 s Redis timeout with room to spare on a loaded machine.
REDIS_PAUSE_MS = 1500


# --------------------------------------------------------------------------------------------
# the checker


def _ref(kind: str, name: str) -> dict[str, str]:
    return {"$ref": f"#/components/{kind}/{name}"}


def _escape(part: str) -> str:
    return part.replace("~", "~0").replace("/", "~1")


def _lookup(pointer: str) -> Any:
    node: Any = DOC
    for part in pointer.lstrip("/").split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def _deref(obj: dict[str, Any], pointer: str) -> tuple[dict[str, Any], str]:
    """Follow a response/header ``$ref`` inside the document; return the object and its pointer."""
    while "$ref" in obj:
        pointer = obj["$ref"].removeprefix("#")
        obj = _lookup(pointer)
    return obj, pointer


def _template(path: str) -> re.Pattern[str]:
    return re.compile("^" + re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(path)) + "$")


TEMPLATES = {path: _template(path) for path in DOC["paths"]}


def documented_response(method: str, path: str, status: int) -> tuple[dict[str, Any], str]:
    """The response object the document promises for this exchange, and its pointer."""
    path = path.partition("?")[0]
    matches = [template for template, regex in TEMPLATES.items() if regex.match(path)]
    assert len(matches) <= 1, f"{path} matches several documented paths: {matches}"
    if not matches:
        assert status == 404, f"{path} is not documented but answered {status}"
        return _deref(_ref("responses", "NotFound"), "")
    item = DOC["paths"][matches[0]]
    if method.lower() not in item:
        assert status == 405, f"{method} {matches[0]} is not documented but answered {status}"
        return _deref(_ref("responses", "MethodNotAllowed"), "")
    responses = item[method.lower()]["responses"]
    base = f"/paths/{_escape(matches[0])}/{method.lower()}/responses"
    for key in (str(status), f"{status // 100}XX", "default"):
        if key in responses:
            return _deref(responses[key], f"{base}/{key}")
    raise AssertionError(f"{method} {matches[0]}: status {status} is not documented")


def check_against_document(
    method: str, path: str, status: int, content_type: str, headers: Any, body: bytes
) -> Any:
    """Assert that a real response is one the document describes; return the parsed body."""
    described, pointer = documented_response(method, path, status)
    for name, header_ref in described.get("headers", {}).items():
        header, _ = _deref(header_ref, "")
        value = headers.get(name)
        if header.get("required"):
            assert value is not None, f"{method} {path} {status}: header {name} is missing"
        if value is not None:
            instance = int(value) if header["schema"].get("type") == "integer" else value
            _validate(instance, header["schema"], f"header {name}")
    content = described.get("content")
    if content is None:
        assert not body, f"{method} {path} {status}: a body where none is documented"
        return None
    assert content_type in content, (
        f"{method} {path} {status}: {content_type} is not one of {sorted(content)}"
    )
    schema_pointer = f"{pointer}/content/{_escape(content_type)}/schema"
    if content_type == "text/event-stream":
        return _check_events(body, schema_pointer, f"{method} {path} {status}")
    is_json = content_type == "application/json" or content_type.endswith("+json")
    instance = orjson.loads(body) if is_json else body.decode()
    _validate(instance, {"$ref": f"{BASE}#{schema_pointer}"}, f"{method} {path} {status}")
    return instance


def _check_events(body: bytes, schema_pointer: str, what: str) -> Any:
    """An event stream: OpenAPI 3.1 describes each event (``schema``), whose data is JSON of
    its ``contentSchema`` (which JSON Schema only annotates, so it is checked here); returns the
    first event's data."""
    events = []
    for block in body.decode().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        fields.pop("", None)  # a comment
        if "data" in fields:
            events.append(fields)
    assert events, f"{what}: no event in {body!r}"
    data_ref = _lookup(schema_pointer)["properties"]["data"]["contentSchema"]["$ref"]
    data_schema = {"$ref": f"{BASE}{data_ref}"}
    for event in events:
        _validate(event, {"$ref": f"{BASE}#{schema_pointer}"}, f"{what} event")
        _validate(orjson.loads(event["data"]), data_schema, f"{what} event data")
    return orjson.loads(events[0]["data"])


def _validate(instance: Any, schema: dict[str, Any], what: str) -> None:
    validator = Draft202012Validator(
        schema, registry=REGISTRY, format_checker=Draft202012Validator.FORMAT_CHECKER
    )
    problems_found = [
        f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
        for e in validator.iter_errors(instance)
    ]
    assert not problems_found, f"{what} does not match the document: {problems_found}\n{instance}"


# --------------------------------------------------------------------------------------------
# the document itself


def test_document_is_valid_openapi_3_1() -> None:
    assert DOC["openapi"] == "3.1.0"
    validate(DOC)


def _app_operations() -> set[tuple[str, str]]:
    # Building the app opens nothing (resources open on start-up), so no servers are needed.
    app = create_app(Settings())
    return {
        (route.resource.canonical, route.method.lower())
        for route in app.router.routes()
        if route.method != "HEAD" and route.resource is not None
    }


def _documented_operations() -> set[tuple[str, str]]:
    return {
        (path, method)
        for path, item in DOC["paths"].items()
        for method in item
        if method in METHODS
    }


def test_every_route_is_documented_and_every_operation_is_routed() -> None:
    routed, documented = _app_operations(), _documented_operations()
    assert routed - documented == set(), "routes missing from the document"
    assert documented - routed == set(), "documented operations the app does not serve"


def test_documented_path_parameters_are_the_template_names() -> None:
    for path, item in DOC["paths"].items():
        names = set(re.findall(r"\{([^}]+)\}", path))
        for method in (m for m in item if m in METHODS):
            params = [_deref(p, "")[0] for p in item[method].get("parameters", [])]
            declared = {p["name"] for p in params if p["in"] == "path"}
            assert declared == names, f"{method} {path}: path parameters {declared} != {names}"


def test_info_version_is_the_package_version() -> None:
    assert DOC["info"]["version"] == importlib.metadata.version("coupon-drop")


def test_problem_codes_are_the_error_codes_and_the_router_codes() -> None:
    app_errors = [
        value
        for value in vars(errors).values()
        if isinstance(value, type) and issubclass(value, errors.AppError)
    ]
    router_codes = {problems._http_code(status) for status in (400, 404, 405, 413, 500, 503)}
    expected = {cls.code for cls in app_errors} | router_codes
    assert set(DOC["components"]["schemas"]["Problem"]["properties"]["code"]["enum"]) == expected


def test_admin_operations_and_only_they_need_the_bearer_token() -> None:
    assert DOC["components"]["securitySchemes"]["adminToken"]["scheme"] == "bearer"
    # The console's reads also take its session cookie; signing in and out and the console's
    # files need nothing (the files are the same for everyone, the data is behind the token).
    console_reads = {("/admin/console", "get"), ("/admin/console/events", "get")}
    open_admin = {
        ("/admin/console/session", "post"),
        ("/admin/console/logout", "post"),
        ("/admin/console/assets/{name}", "get"),
    }
    for path, method in _documented_operations():
        operation = DOC["paths"][path][method]
        admin = [{"adminToken": []}]
        if (path, method) in console_reads:
            admin = [{"adminToken": []}, {"consoleSession": []}]
        needs_token = operation.get("security") == admin
        if (path, method) in open_admin:
            assert "security" not in operation, f"{method} {path}"
        else:
            assert needs_token == path.startswith("/admin/"), f"{method} {path}"
        # Routes acting for a user take the user's token (required when COUPON_AUTH=jwt).
        user_token = operation.get("security") == [{}, {"userToken": []}]
        signs_in = (path, method) == ("/admin/console/session", "post")
        has_401 = "401" in operation["responses"]
        assert has_401 == (needs_token or user_token or signs_in), f"{method} {path}"


async def test_served_document_is_the_module_document(client: Client) -> None:
    response = await client.get("/openapi.json")
    assert response.status == 200
    assert response.content_type == "application/json"
    assert orjson.loads(await response.read()) == DOC


# --------------------------------------------------------------------------------------------
# the document against the code that enforces it

PROBLEM_JSON = "application/problem+json"
SCHEMAS = DOC["components"]["schemas"]


def _subclasses(base: type[errors.AppError]) -> list[type[errors.AppError]]:
    found = [base]
    for cls in base.__subclasses__():
        found.extend(_subclasses(cls))
    return found


# Every error class loaded (the app above imports every module that raises one).
APP_ERRORS = sorted(set(_subclasses(errors.AppError)), key=lambda cls: cls.__name__)
# Errors a route can raise that the document does not describe yet, with where. An entry is a
# known gap: the problem tests fail once the document covers it, so the entry goes with it.
UNDOCUMENTED_ERRORS: dict[type[errors.AppError], str] = {}
DOCUMENTED_ERRORS = [cls for cls in APP_ERRORS if cls not in UNDOCUMENTED_ERRORS]
# aiohttp's own errors, rendered by the problem middleware: no such path (also the admin
# routes' 404 for a path that does not say /admin/ literally), no such method, body too large.
ROUTER_STATUSES = (404, 405, 413)


def test_file_is_canonical_json_and_the_served_document_but_the_version() -> None:
    raw = importlib.resources.files("gateway").joinpath("openapi.json").read_bytes()
    loaded = orjson.loads(raw)
    assert raw == orjson.dumps(loaded, option=orjson.OPT_INDENT_2) + b"\n", (
        "gateway/openapi.json is not orjson.dumps(..., option=OPT_INDENT_2) plus a newline"
    )
    assert loaded == {**DOC, "info": {**DOC["info"], "version": openapi.PLACEHOLDER_VERSION}}


def _routed(app: web.Application) -> set[tuple[str, str]]:
    routes = {
        (route.resource.canonical, route.method.lower())
        for route in app.router.routes()
        if route.resource is not None
    }
    gets = {path for path, method in routes if method == "get"}
    heads = {path for path, method in routes if method == "head"}
    assert heads == gets, "the document says that every GET, and only a GET, also answers HEAD"
    return {(path, method) for path, method in routes if method != "head"}


ARRANGEMENTS = {
    "one-listener": {},
    "admin-port": {"admin_port": 8081},
    "admin-port-with-ops": {"admin_port": 8081, "ops_on_admin_port": True},
}


@pytest.mark.parametrize("changes", ARRANGEMENTS.values(), ids=list(ARRANGEMENTS))
def test_the_public_and_admin_apps_serve_exactly_the_documented_operations(
    changes: dict[str, Any],
) -> None:
    settings = Settings(**changes)
    public = _routed(create_app(settings))
    admin = _routed(create_admin_app(settings)) if settings.admin_port else set()
    documented = _documented_operations()
    assert public & admin == set(), "operations served on both listeners"
    assert (public | admin) - documented == set(), "routes missing from the document"
    assert documented - (public | admin) == set(), "documented operations no app serves"
    if settings.admin_port:
        tagged = {op for op in documented if DOC["paths"][op[0]][op[1]]["tags"] == ["admin"]}
        assert {op for op in admin if op[0].startswith("/admin/")} == tagged


def _problem_responses() -> list[tuple[str, dict[str, Any]]]:
    """Every problem+json response object of the document, with its JSON pointer."""
    found = [
        (f"/components/responses/{name}", item)
        for name, item in DOC["components"]["responses"].items()
    ]
    for path, method in sorted(_documented_operations()):
        base = f"/paths/{_escape(path)}/{method}/responses"
        responses = DOC["paths"][path][method]["responses"].items()
        found.extend((f"{base}/{key}", item) for key, item in responses if "$ref" not in item)
    return [(pointer, item) for pointer, item in found if PROBLEM_JSON in item.get("content", {})]


def _pinned(response: dict[str, Any]) -> tuple[int, set[str]]:
    """The status and codes a problem response's schema allows."""
    pinned = response["content"][PROBLEM_JSON]["schema"]["properties"]
    return pinned["status"]["const"], set(pinned["code"]["enum"])


def test_problem_statuses_and_codes_are_those_the_code_answers() -> None:
    raised = {(cls.status, cls.code) for cls in DOCUMENTED_ERRORS}
    routed = {(status, problems._http_code(status)) for status in ROUTER_STATUSES}
    fallback_body = problems.internal_error().body
    assert isinstance(fallback_body, bytes)
    fallback = orjson.loads(fallback_body)
    routed.add((fallback["status"], fallback["code"]))
    documented = {
        (status, code)
        for _, response in _problem_responses()
        for status, codes in [_pinned(response)]
        for code in codes
    }
    assert documented - (raised | routed) == set(), "documented problems no code answers"
    assert (raised | routed) - documented == set(), "problems the code answers, not documented"
    gaps = {(cls.status, cls.code) for cls in UNDOCUMENTED_ERRORS}
    assert gaps & documented == set(), "documented now: remove them from UNDOCUMENTED_ERRORS"
    for path, method in _documented_operations():
        for key, item in DOC["paths"][path][method]["responses"].items():
            described, _ = _deref(item, "")
            if PROBLEM_JSON in described.get("content", {}):
                assert str(_pinned(described)[0]) == key, f"{method} {path}: {key} is another's"
    pattern = SCHEMAS["Problem"]["properties"]["type"]["pattern"]
    assert pattern == "^" + re.escape(problems.PROBLEM_TYPE)


def _instance(cls: type[errors.AppError]) -> errors.AppError:
    """An instance of ``cls``, its required keyword arguments (``retry_after``) set to 1."""
    required = {
        name: 1
        for name, parameter in inspect.signature(cls).parameters.items()
        if parameter.kind is parameter.KEYWORD_ONLY and parameter.default is parameter.empty
    }
    return cls("a detail", **required)


@pytest.mark.parametrize("cls", DOCUMENTED_ERRORS, ids=lambda cls: cls.__name__)
def test_every_error_renders_as_its_documented_problems_with_their_headers(
    cls: type[errors.AppError],
) -> None:
    error = _instance(cls)
    rendered = problems.render(error)
    assert isinstance(rendered.body, bytes)
    body = orjson.loads(rendered.body)
    added = error.headers() or {}
    matching = [
        (pointer, response)
        for pointer, response in _problem_responses()
        if _pinned(response)[0] == cls.status and cls.code in _pinned(response)[1]
    ]
    assert matching, f"{cls.__name__}: no problem response for {cls.status} {cls.code}"
    for pointer, response in matching:
        schema = {"$ref": f"{BASE}#{pointer}/content/{_escape(PROBLEM_JSON)}/schema"}
        _validate(body, schema, f"{cls.__name__} against {pointer}")
        documented = set(response["headers"]) - {"X-Request-ID"}
        assert documented == set(added), f"{cls.__name__} at {pointer}: headers differ"
        for name, value in added.items():
            header, _ = _deref(response["headers"][name], "")
            instance = int(value) if header["schema"].get("type") == "integer" else value
            _validate(instance, header["schema"], f"{cls.__name__}: header {name}")


def test_seed_comments_are_the_rejections_seed_messages() -> None:
    (refused,) = [
        branch
        for branch in SCHEMAS["SeedResult"]["oneOf"]
        if branch["properties"]["isSuccess"]["const"] is False
    ]
    messages = {cls.seed_message for cls in APP_ERRORS if issubclass(cls, errors.Rejection)}
    assert set(refused["properties"]["comment"]["enum"]) == messages


def _accepts(parse: Callable[[Any], object], value: Any) -> bool:
    try:
        parse(value)
    except errors.InvalidRequest:
        return False
    return True


def _schema_accepts(schema: dict[str, Any], value: Any) -> bool:
    return bool(Draft202012Validator(schema, registry=REGISTRY).is_valid(value))


def test_id_range_is_the_parsers() -> None:
    low, high = SCHEMAS["Id"]["minimum"], SCHEMAS["Id"]["maximum"]
    assert (low, high) == (1, MAX_ID)
    for parse in (partial(ids.json_id, name="id"), lambda raw: ids.parse_id(str(raw), "id")):
        for value in (low - 1, low, high, high + 1):
            assert _accepts(parse, value) == _schema_accepts(SCHEMAS["Id"], value), value
    assert not _accepts(partial(ids.json_id, name="id"), True)
    assert not _schema_accepts(SCHEMAS["Id"], True)


# The request bodies, the validators that read them and the least body each accepts.
BODIES: dict[str, tuple[Callable[[Any], object], dict[str, Any]]] = {
    "NewCoupon": (
        NewCoupon.from_json,
        {
            "title": "t",
            "date_issue_start": "2030-01-01T00:00:00+09:00",
            "date_issue_end": "2030-01-02T00:00:00+09:00",
        },
    ),
    "CouponChange": (CouponChange.from_json, {"paused": False}),
}
AMOUNTS = [
    ("NewCoupon", "total_quantity"),
    ("NewCoupon", "discount_amount"),
    ("NewCoupon", "min_available_amount"),
    ("CouponChange", "total_quantity"),
]


@pytest.mark.parametrize(("body", "name"), AMOUNTS)
def test_amount_ranges_and_defaults_are_the_validators(body: str, name: str) -> None:
    """The document and the validator give every value the same verdict."""
    parse, least = BODIES[body]
    documented = SCHEMAS[body]["properties"][name]
    low, high = documented["minimum"], documented["maximum"]
    assert (low, high) == (0, MAX_INT32)
    for value in (low - 1, low, high, high + 1, None, True, "1"):
        in_code = _accepts(parse, {**least, name: value})
        assert in_code == _schema_accepts(documented, value), f"{body}.{name}={value!r}"
    if "default" in documented:
        assert getattr(parse(least), name) == documented["default"], f"{body}.{name} default"


@pytest.mark.parametrize("body", BODIES)
def test_title_length_is_the_validators(body: str) -> None:
    parse, least = BODIES[body]
    documented = SCHEMAS[body]["properties"]["title"]
    low, high = documented["minLength"], documented["maxLength"]
    assert (low, high) == (1, TITLE_MAX_LENGTH)
    for title in ("x" * (low - 1), "x" * low, "x" * high, "x" * (high + 1), " ", " x ", 7):
        in_code = _accepts(parse, {**least, "title": title})
        assert in_code == _schema_accepts(documented, title), f"{body}.title={title!r:.20}"


def _walk(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)


def test_every_integer_format_fits_its_range() -> None:
    for node in _walk(DOC):
        if "format" in node and "integer" in node.get("type", ()):
            wide = node.get("maximum", MAX_ID) > MAX_INT32 or node.get("minimum", 0) < -MAX_INT32
            assert node["format"] == ("int64" if wide else "int32"), node


def test_coupon_type_is_the_models() -> None:
    found = [
        node["properties"]["coupon_type"]
        for node in _walk(DOC)
        if "coupon_type" in node.get("properties", {})
    ]
    assert found, "no schema has coupon_type"
    assert all(item == {"const": COUPON_TYPE} for item in found), found


def test_settings_named_in_the_document_exist() -> None:
    named = {
        name
        for node in _walk(DOC)
        if isinstance(node.get("description"), str)
        for name in re.findall(r"\bCOUPON_[A-Z0-9_]+", node["description"])
    }
    assert "COUPON_MAX_BODY_BYTES" in named, "the 413 no longer names the body size setting"
    assert named - set(ENVIRONMENT) == set(), "the document names settings that do not exist"


def test_request_id_length_is_the_middlewares() -> None:
    components = DOC["components"]
    limit = components["headers"]["RequestId"]["schema"]["maxLength"]
    assert f"first {limit} characters" in components["parameters"]["RequestId"]["description"]
    sent = make_mocked_request("GET", "/", headers={"X-Request-ID": "a" * (limit + 1)})
    assert problems.request_id_of(sent) == "a" * limit


def test_every_operation_answers_500_and_every_response_carries_the_request_id() -> None:
    """What the problem middleware adds to every route, and the body reader to those with one."""
    for path, method in _documented_operations():
        operation = DOC["paths"][path][method]
        responses = operation["responses"]
        assert responses["500"] == _ref("responses", "InternalError"), f"{method} {path}"
        if "requestBody" in operation:
            assert responses["400"] == _ref("responses", "InvalidRequest"), f"{method} {path}"
            assert responses["413"] == _ref("responses", "TooLarge"), f"{method} {path}"
        for key, item in responses.items():
            described, _ = _deref(item, "")
            request_id = described["headers"]["X-Request-ID"]
            assert request_id == _ref("headers", "RequestId"), f"{method} {path} {key}"
    for name, item in DOC["components"]["responses"].items():
        assert item["headers"]["X-Request-ID"] == _ref("headers", "RequestId"), name


async def test_list_query_limits_are_the_handlers(client: Client) -> None:
    parameters = DOC["paths"]["/admin/coupons"]["get"]["parameters"]
    limits = {p["name"]: p["schema"] for p in parameters if p.get("in") == "query"}
    assert set(limits) == {"after", "limit"}
    assert limits["after"]["maximum"] == MAX_ID
    for name, schema in limits.items():
        low, high = schema["minimum"], schema["maximum"]
        for value, status in ((low, 200), (high, 200), (low - 1, 400), (high + 1, 400)):
            response = await client.get("/admin/coupons", params={name: value}, headers=ADMIN)
            assert response.status == status, f"?{name}={value}: {await response.text()}"


# --------------------------------------------------------------------------------------------
# real exchanges against the document


@dataclass(frozen=True)
class C:
    """A coupon of the test world, by role: open, sold, future or missing."""

    role: str


@dataclass(frozen=True)
class Exchange:
    method: str
    # Placeholders {open}, {sold}, {future}, {missing} are the world's coupon ids.
    path: str
    status: int
    json: Any = None
    data: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    # Members the JSON answer must have, so each case proves it hit the intended branch.
    expect: dict[str, Any] = field(default_factory=dict)
    # (role, user) this exchange accepts or definitely rejects, for the invariants.
    accepts: tuple[str, int] | None = None
    rejects: tuple[str, int] | None = None
    redis_paused: bool = False
    follow_redirects: bool = True


def case(method: str, path: str, status: int, case_id: str, **kw: Any) -> Any:
    """One row of the exchange table, shown by pytest under ``case_id``."""
    return pytest.param(Exchange(method, path, status, **kw), id=case_id)


OPEN_START, OPEN_END = "2030-01-01T00:00:00+09:00", "2030-01-02T00:00:00+09:00"
NEW_COUPON = {
    "title": "openapi drop",
    "total_quantity": 5,
    "discount_amount": 100,
    "min_available_amount": 1000,
    "date_issue_start": OPEN_START,
    "date_issue_end": OPEN_END,
}
TOO_LARGE = b'{"user_id": 2, "pad": "' + b"x" * 5000 + b'"}'
WRONG_TOKEN = {"Authorization": "Bearer not-the-admin-token-at-all"}
HTML = {"Accept": "text/html"}
FORM = {"Content-Type": "application/x-www-form-urlencoded"}
SIGN_IN = f"token={ADMIN_TOKEN}".encode()
SEED_DATE = errors.OutsideWindow.seed_message

# fmt: off
EXCHANGES = [
    # native issue
    case("POST", "/v1/coupons/{open}/issues", 202, "issue-202", json={"user_id": 2},
      expect={"status": "accepted", "user_id": 2}, accepts=("open", 2)),
    case("POST", "/v1/coupons/{open}/issues", 400, "issue-400-zero-user", json={"user_id": 0},
      expect={"code": "INVALID_REQUEST"}),
    case("POST", "/v1/coupons/{open}/issues", 400, "issue-400-not-json", data=b"{",
      expect={"code": "INVALID_REQUEST"}),
    case("POST", "/v1/coupons/abc/issues", 400, "issue-400-bad-path-id", json={"user_id": 2},
      expect={"code": "INVALID_REQUEST"}),
    case("POST", "/v1/coupons/{missing}/issues", 404, "issue-404", json={"user_id": 2},
      expect={"code": "COUPON_NOT_EXIST"}),
    case("POST", "/v1/coupons/{open}/issues", 409, "issue-409-duplicate", json={"user_id": 1},
      expect={"code": "DUPLICATED_COUPON_ISSUE"}),
    case("POST", "/v1/coupons/{sold}/issues", 409, "issue-409-sold-out", json={"user_id": 2},
      expect={"code": "INVALID_COUPON_ISSUE_QUANTITY"}, rejects=("sold", 2)),
    case("POST", "/v1/coupons/{future}/issues", 409, "issue-409-window", json={"user_id": 2},
      expect={"code": "INVALID_COUPON_ISSUE_DATE"}, rejects=("future", 2)),
    case("POST", "/v1/coupons/{open}/issues", 413, "issue-413", data=TOO_LARGE,
      headers={"Content-Type": "application/json"}),
    case("POST", "/v1/coupons/{missing}/issues", 503, "issue-503-redis-paused",
      json={"user_id": 2}, redis_paused=True),
    # status and snapshot
    case("GET", "/v1/coupons/{open}/issues/1", 200, "status-200", expect={"status": "pending"}),
    case("GET", "/v1/coupons/{open}/issues/2", 404, "status-404-never-requested",
      expect={"code": "ISSUE_NOT_FOUND"}),
    case("GET", "/v1/coupons/{missing}/issues/1", 404, "status-404-no-coupon",
      expect={"code": "COUPON_NOT_EXIST"}),
    case("GET", "/v1/coupons/{open}/issues/0", 400, "status-400"),
    case("GET", "/v1/coupons/{open}/issues/1", 503, "status-503-redis-paused", redis_paused=True),
    case("GET", "/v1/coupons/{open}", 200, "snapshot-200", expect={"remaining": 2}),
    case("GET", "/v1/coupons/{open}/events", 200, "events-200",
      expect={"remaining": 2, "phase": "open"}),
    case("GET", "/v1/coupons/{open}/events", 200, "events-200-bad-last-event-id",
      headers={"Last-Event-ID": "garbage"}, expect={"remaining": 2}),
    case("GET", "/v1/coupons/0/events", 400, "events-400", expect={"code": "INVALID_REQUEST"}),
    case("GET", "/v1/coupons/{missing}/events", 404, "events-404",
      expect={"code": "COUPON_NOT_EXIST"}),
    case("GET", "/v1/coupons/{missing}/events", 503, "events-503-redis-paused",
      redis_paused=True),
    case("GET", "/v1/coupons/{sold}", 200, "snapshot-200-sold-out", expect={"sold_out": True}),
    case("GET", "/v1/coupons/{missing}", 404, "snapshot-404"),
    case("GET", f"/v1/coupons/{MAX_ID + 1}", 400, "snapshot-400-id-too-big"),
    case("GET", "/v1/coupons/{missing}", 503, "snapshot-503-redis-paused", redis_paused=True),
    # seed routes
    case("POST", "/v1/issue", 200, "seed-sync-true", json={"userId": 2, "couponId": C("open")},
      expect={"isSuccess": True}, accepts=("open", 2)),
    case("POST", "/v1/issue", 200, "seed-sync-false-duplicate",
      json={"userId": 1, "couponId": C("open")}, expect={"isSuccess": False}),
    case("POST", "/v1/issue", 400, "seed-sync-400-no-coupon-id", json={"userId": 2}),
    case("POST", "/v1/issue-async", 200, "seed-async-true",
      json={"userId": 3, "couponId": C("open")}, expect={"isSuccess": True}, accepts=("open", 3)),
    case("POST", "/v1/issue-async", 200, "seed-async-false-sold-out",
      json={"userId": 3, "couponId": C("sold")}, expect={"isSuccess": False},
      rejects=("sold", 3)),
    case("POST", "/v1/issue-async", 400, "seed-async-400-string-id",
      json={"userId": "3", "couponId": C("open")}),
    case("POST", "/v1/issue-async", 503, "seed-async-503-redis-paused",
      json={"userId": 3, "couponId": C("missing")}, redis_paused=True),
    case("POST", "/v2/issue-async", 200, "seed-v2-true", json={"userId": 4, "couponId": C("open")},
      expect={"isSuccess": True}, accepts=("open", 4)),
    case("POST", "/v2/issue-async", 200, "seed-v2-false-window",
      json={"userId": 4, "couponId": C("future")},
      expect={"isSuccess": False, "comment": SEED_DATE}, rejects=("future", 4)),
    case("POST", "/v2/issue-async", 413, "seed-v2-413", data=TOO_LARGE,
      headers={"Content-Type": "application/json"}),
    case("GET", "/hello", 200, "hello-200"),
    # admin
    case("POST", "/admin/coupons", 201, "admin-create-201", json=NEW_COUPON, headers=ADMIN,
      expect={"title": "openapi drop", "total_quantity": 5, "paused": False}),
    case("POST", "/admin/coupons", 400, "admin-create-400-window-reversed", headers=ADMIN,
      json={**NEW_COUPON, "date_issue_start": OPEN_END, "date_issue_end": OPEN_START}),
    case("POST", "/admin/coupons", 401, "admin-create-401-no-token", json=NEW_COUPON,
      expect={"code": "UNAUTHORIZED"}),
    case("POST", "/admin/coupons", 401, "admin-create-401-wrong-token", json=NEW_COUPON,
      headers=WRONG_TOKEN),
    case("POST", "/admin/coupons", 413, "admin-create-413", data=TOO_LARGE,
      headers={**ADMIN, "Content-Type": "application/json"}),
    case("GET", "/admin/coupons", 200, "admin-list-200", headers=ADMIN,
      expect={"next_after": None}),
    case("GET", "/admin/coupons?limit=2", 200, "admin-list-200-next-page", headers=ADMIN),
    case("GET", "/admin/coupons?limit=0", 400, "admin-list-400-limit", headers=ADMIN),
    case("GET", "/admin/coupons", 401, "admin-list-401"),
    case("GET", "/admin/coupons/{open}", 200, "admin-show-200", headers=ADMIN,
      expect={"requested": 1, "reserved": 1}),
    case("GET", "/admin/coupons/{missing}", 404, "admin-show-404", headers=ADMIN),
    case("GET", "/admin/coupons/0", 400, "admin-show-400", headers=ADMIN),
    case("GET", "/admin/coupons/{open}", 401, "admin-show-401", headers=WRONG_TOKEN),
    case("GET", "/admin/coupons/{open}", 503, "admin-show-503-redis-paused", headers=ADMIN,
      redis_paused=True),
    case("GET", "/admin/coupons/{open}/winners", 200, "admin-winners-200-csv",
      headers={**ADMIN, "Accept": "text/csv"}),
    case("GET", "/admin/coupons/{open}/winners", 200, "admin-winners-200-jsonl", headers=ADMIN),
    case("GET", "/admin/coupons/{missing}/winners", 404, "admin-winners-404", headers=ADMIN),
    case("GET", "/admin/coupons/{open}/winners", 401, "admin-winners-401"),
    case("PATCH", "/admin/coupons/{open}", 200, "admin-patch-200", headers=ADMIN,
      json={"total_quantity": 10, "paused": True}, expect={"total_quantity": 10, "paused": True}),
    case("PATCH", "/admin/coupons/{open}", 400, "admin-patch-400-unknown-field", headers=ADMIN,
      json={"discount_amount": 5}),
    case("PATCH", "/admin/coupons/{open}", 400, "admin-patch-400-empty", headers=ADMIN, json={}),
    case("PATCH", "/admin/coupons/{missing}", 404, "admin-patch-404", headers=ADMIN,
      json={"title": "renamed"}),
    case("PATCH", "/admin/coupons/{open}", 409, "admin-patch-409-below-reserved", headers=ADMIN,
      json={"total_quantity": 0}, expect={"code": "CONFLICT"}),
    case("PATCH", "/admin/coupons/{open}", 401, "admin-patch-401", json={"title": "renamed"}),
    case("POST", "/admin/coupons/{open}/retire", 409, "admin-retire-409-live", headers=ADMIN,
      expect={"code": "CONFLICT"}),
    case("POST", "/admin/coupons/{missing}/retire", 404, "admin-retire-404", headers=ADMIN),
    case("POST", "/admin/coupons/{open}/retire", 401, "admin-retire-401"),
    case("GET", "/admin/audit", 200, "admin-audit-200", headers=ADMIN,
      expect={"next_after": None}),
    case("GET", "/admin/audit?coupon_id={open}&limit=1", 200, "admin-audit-200-one-coupon",
      headers=ADMIN),
    case("GET", "/admin/audit?coupon_id=abc", 400, "admin-audit-400", headers=ADMIN,
      expect={"code": "INVALID_REQUEST"}),
    case("GET", "/admin/audit", 401, "admin-audit-401", headers=WRONG_TOKEN),
    # pages and the console
    case("GET", "/try/{open}", 200, "try-200", headers=HTML),
    case("GET", "/try/0", 400, "try-400", expect={"code": "INVALID_REQUEST"}),
    case("GET", "/try/{missing}", 404, "try-404", expect={"code": "COUPON_NOT_EXIST"}),
    case("GET", "/try/{missing}", 503, "try-503-redis-paused", redis_paused=True),
    case("GET", "/pages/try.js", 200, "page-file-200"),
    case("GET", "/pages/console.js", 404, "page-file-404", expect={"code": "NOT_FOUND"}),
    case("GET", "/admin/console", 200, "console-200", headers={**ADMIN, **HTML}),
    case("GET", "/admin/console", 401, "console-401-sign-in-form", headers=HTML),
    case("GET", "/admin/console", 401, "console-401-problem", expect={"code": "UNAUTHORIZED"}),
    case("GET", "/admin/console/events", 200, "console-events-200", headers=ADMIN,
      expect={"more": 0}),
    case("GET", "/admin/console/events", 401, "console-events-401", headers=WRONG_TOKEN),
    case("POST", "/admin/console/session", 303, "console-sign-in-303", data=SIGN_IN,
      headers=FORM, follow_redirects=False),
    case("POST", "/admin/console/session", 400, "console-sign-in-400-no-token", data=b"x=1",
      headers=FORM, expect={"code": "INVALID_REQUEST"}),
    case("POST", "/admin/console/session", 401, "console-sign-in-401", headers=FORM,
      data=b"token=not-the-admin-token-at-all", expect={"code": "UNAUTHORIZED"}),
    case("POST", "/admin/console/session", 401, "console-sign-in-401-form-again",
      headers={**FORM, **HTML}, data=b"token=not-the-admin-token-at-all"),
    case("POST", "/admin/console/session", 403, "console-sign-in-403-other-origin",
      data=SIGN_IN, headers={**FORM, "Origin": "https://elsewhere.example"},
      expect={"code": "FORBIDDEN"}),
    case("POST", "/admin/console/session", 413, "console-sign-in-413", headers=FORM,
      data=b"token=" + b"x" * 5000),
    case("POST", "/admin/console/logout", 303, "console-sign-out-303", follow_redirects=False),
    case("GET", "/admin/console/assets/console.js", 200, "console-file-200"),
    case("GET", "/admin/console/assets/try.js", 404, "console-file-404"),
    # operations
    case("GET", "/healthz", 200, "healthz-200"),
    case("GET", "/readyz", 200, "readyz-200"),
    case("GET", "/readyz", 503, "readyz-503-redis-paused", redis_paused=True,
      expect={"ready": False, "redis": "unreachable"}),
    case("GET", "/metrics", 200, "metrics-200-prometheus"),
    case("GET", "/metrics", 200, "metrics-200-openmetrics",
      headers={"Accept": "application/openmetrics-text"}),
    case("GET", "/openapi.json", 200, "openapi-200"),
    # outside the document
    case("GET", "/v1/coupons/{open}/issues", 405, "wrong-method-405-get-issues",
      expect={"code": "METHOD_NOT_ALLOWED"}),
    case("DELETE", "/admin/coupons/{open}", 405, "wrong-method-405-delete-coupon", headers=ADMIN),
    case("PUT", "/hello", 405, "wrong-method-405-put-hello"),
    case("GET", "/v1/nothing/here", 404, "unknown-path-404", expect={"code": "NOT_FOUND"}),
]
# fmt: on


@dataclass
class World:
    """Three coupons with user 1 already accepted on ``open`` (total 3) and ``sold`` (total 1),
    ``future`` (window not started), and an id no coupon has."""

    ids: dict[str, int]
    coupons: dict[str, Any]
    accepted: dict[str, set[int]]
    rejected: dict[str, set[int]]

    def fill(self, value: Any) -> Any:
        if isinstance(value, C):
            return self.ids[value.role]
        if isinstance(value, dict):
            return {key: self.fill(item) for key, item in value.items()}
        return value


@pytest.fixture
async def world(client: Client, make_coupon: CouponFactory) -> World:
    soon = datetime.now(UTC) + timedelta(hours=1)
    made = {
        "open": await make_coupon(3),
        "sold": await make_coupon(1),
        "future": await make_coupon(3, start=soon, end=soon + timedelta(hours=1)),
    }
    for role in ("open", "sold"):
        response = await client.post(f"/v1/coupons/{made[role].id}/issues", json={"user_id": 1})
        assert response.status == 202, await response.text()
    return World(
        ids={**{role: c.id for role, c in made.items()}, "missing": MAX_ID},
        coupons=made,
        accepted={"open": {1}, "sold": {1}, "future": set()},
        rejected={"open": set(), "sold": set(), "future": set()},
    )


@pytest.mark.parametrize("exchange", EXCHANGES)
async def test_real_response_matches_the_document(
    exchange: Exchange,
    client: Client,
    world: World,
    redis: Redis,
    pool: aiomysql.Pool,
    settings: Settings,
    check_invariants: Checker,
) -> None:
    path = exchange.path.format(**world.ids)
    kwargs: dict[str, Any] = {"headers": exchange.headers}
    if exchange.json is not None:
        kwargs["json"] = world.fill(exchange.json)
    if exchange.data is not None:
        kwargs["data"] = exchange.data
    if exchange.redis_paused:
        # A real stall: Redis answers nobody until the pause ends.
        await redis.execute_command("CLIENT", "PAUSE", REDIS_PAUSE_MS, "ALL")
    try:
        response = await client.request(
            exchange.method, path, allow_redirects=exchange.follow_redirects, **kwargs
        )
        body = await _first_event(response) if _is_stream(response) else await response.read()
    finally:
        if exchange.redis_paused:
            await redis.ping()  # returns once the pause is over
    assert response.status == exchange.status, body.decode(errors="replace")
    parsed = check_against_document(
        exchange.method, path, response.status, response.content_type, response.headers, body
    )
    if exchange.expect:
        assert isinstance(parsed, dict)
        assert {key: parsed.get(key) for key in exchange.expect} == exchange.expect, parsed

    if exchange.accepts:
        world.accepted[exchange.accepts[0]].add(exchange.accepts[1])
    if exchange.rejects:
        world.rejected[exchange.rejects[0]].add(exchange.rejects[1])
    await drain(redis, pool, settings)
    for role, coupon in world.coupons.items():
        await check_invariants(coupon, accepted=world.accepted[role], rejected=world.rejected[role])


def _is_stream(response: Any) -> bool:
    return response.status == 200 and response.content_type == "text/event-stream"


async def _first_event(response: Any) -> bytes:
    """A live feed never ends: its body up to the first event (after ``retry:``)."""
    body = b""
    async with asyncio.timeout(5):
        while b"\ndata:" not in body or not body.endswith(b"\n\n"):
            line = await response.content.readline()
            assert line, f"the stream ended early: {body!r}"
            body += line
    response.close()
    return body


def _exchanged_operations() -> Iterator[tuple[str, str]]:
    for param in EXCHANGES:
        exchange: Exchange = param.values[0]
        path = exchange.path.format(open=1, sold=2, future=3, missing=4).partition("?")[0]
        for template, regex in TEMPLATES.items():
            if regex.match(path) and exchange.method.lower() in DOC["paths"][template]:
                yield template, exchange.method.lower()


def test_every_documented_operation_is_exercised_by_the_exchanges() -> None:
    assert set(_exchanged_operations()) == _documented_operations()
