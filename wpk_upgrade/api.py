"""The HTTP API (aiohttp, extra ``api``): the reference's three upgrade endpoints and ours.

Started by the daemon on the manager's event loop when ``[api] enabled = true``; it calls the
same in-process objects the sockets serve (``UpgradeService``, ``TaskManager``, ``Admin``).

Endpoints (the OpenAPI 3 document ``openapi.json`` beside this module, served at
``GET /openapi.json`` without authentication):

* ``PUT /agents/upgrade`` (``agents_list``, ``upgrade_version``, ``wpk_repo``, ``use_http``,
  ``force``, ``package_type``), ``PUT /agents/upgrade_custom`` (``agents_list``, ``file_path``,
  ``installer``), ``GET /agents/upgrade_result`` (``agents_list``, default every agent): the
  reference's shapes (reference §1.2, §3.5, §4.9)::

      {"data": {"affected_items": [...], "total_affected_items": N,
                "total_failed_items": M,
                "failed_items": [{"error": {"code": C, "message": T}, "id": ["005"]}]},
       "message": "All upgrade tasks were created", "error": 0}

  ``error`` is 0 when nothing failed, 2 when nothing succeeded, else 1. The framework's
  pre-filter runs first: agent 000 is 1703, an unknown agent 1701, an agent that is not
  active 1707 (upgrades only). A module code ``c`` for an agent becomes failed item
  ``1810 + c`` with the module's text; ``upgrade_result``'s "No task in DB" is 1813.
* ``PUT /agents/upgrade_cancel`` (``agents_list``): the task socket's ``upgrade_cancel``; a
  task whose installer may be running (``upgrade`` sent) is failed item 1818 "Task is already
  being installed, cannot be cancelled".
* ``GET /tasks`` (``status``, ``agents_list``, ``node``, ``since``, ``until``, ``limit``): the
  admin listing, newest first.

Simplifications (docs/compatibility.md): module code 13 is a failed item (1823) instead of
aborting the whole request with HTTP 400 after the other agents' tasks were created; codes
6-8 racing the pre-filter are failed items instead of HTTP 500; the reference's halving
re-send on code 4 does not exist (our service answers every agent); ``wait_for_complete`` and
``pretty`` are accepted and ignored; no RBAC, ``q``, ``select`` or ``sort``; cluster
forwarding (DAPI) is not needed since every node shares the store and serves the request.
Every request needs ``Authorization: Bearer <token>`` with one of ``[api] tokens`` (401
otherwise). Errors are ``{"title", "detail"}`` JSON. The access log has method, path (never the
query string), status and duration; tokens are never logged.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import ssl
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import PluginError, UpgradeCode, upgrade_message

try:
    from aiohttp import web
    from aiohttp.abc import AbstractAccessLogger
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise PluginError(
        "the HTTP API and the metrics endpoint need aiohttp: pip install 'wpk-upgrade[api]'"
    ) from exc

from . import versions
from .admin import AdminRequestError, parse_filter
from .config import split_listen
from .protocol import dumps
from .taskmanager import result_item

if TYPE_CHECKING:
    from .config import ManagerConfig
    from .daemon import Manager

log = logging.getLogger(__name__)
access_log = logging.getLogger("wpk_upgrade.api.access")

UPGRADE_CHUNK = 500  # UPGRADE_CHUNK_SIZE of the reference framework
RESULT_CHUNK = 97  # UPGRADE_RESULT_CHUNK_SIZE
COMMON = frozenset({"pretty", "wait_for_complete"})
#: Request line limit: room for the longest documented parameters, percent-encoded.
MAX_REQUEST_LINE = 1 << 16

#: Framework pre-filter errors (reference §3.5).
AGENT_DOES_NOT_EXIST = (1701, "Agent does not exist")
MANAGER_AGENT = (1703, "Action not available for Manager (agent 000)")
AGENT_NOT_ACTIVE = (1707, "Cannot send request, agent is not active")
MODULE_BASE = 1810

_AGENT_ITEM = re.compile(r"[0-9]{1,9}|all")
_VERSION = re.compile(r"(?:[Ww]azuh )?v?[0-9]{1,9}\.[0-9]{1,9}\.[0-9]{1,9}")
_INSTALLER = re.compile(r"[A-Za-z0-9_,.+: -]+")
_STATUS_WORDS = ("In queue", "Updating", "Updated", "Error", "Cancelled", "Timeout", "Legacy")


class BadRequest(Exception):
    """A request the API refuses with HTTP 400; the text is the ``detail``."""


def problem(status: int, title: str, detail: str, **headers: str) -> web.Response:
    """A ``{"title", "detail"}`` JSON error response."""
    return web.json_response({"title": title, "detail": detail}, status=status, headers=headers)


def openapi_document() -> dict[str, Any]:
    """The API's OpenAPI 3 document."""
    text = resources.files("wpk_upgrade").joinpath("openapi.json").read_text(encoding="utf-8")
    document: dict[str, Any] = json.loads(text)
    return document


# --------------------------------------------------------------------------- results


@dataclass
class Outcome:
    """Affected and failed items of one call, rendered as the reference's ``data`` block."""

    all_msg: str
    some_msg: str
    none_msg: str
    affected: list[dict[str, Any]] = field(default_factory=list)
    failed: dict[tuple[int, str], list[str]] = field(default_factory=dict)

    def fail(self, agent: int, code: int, message: str) -> None:
        self.failed.setdefault((code, message), []).append(f"{agent:03d}")

    def render(self) -> dict[str, Any]:
        failed_count = sum(len(ids) for ids in self.failed.values())
        if not failed_count:
            error, message = 0, self.all_msg if self.affected else self.none_msg
        elif not self.affected:
            error, message = 2, self.none_msg
        else:
            error, message = 1, self.some_msg
        return {
            "data": {
                "affected_items": self.affected,
                "total_affected_items": len(self.affected),
                "total_failed_items": failed_count,
                "failed_items": [
                    {"error": {"code": code, "message": text}, "id": ids}
                    for (code, text), ids in self.failed.items()
                ],
            },
            "message": message,
            "error": error,
        }


def iso_time(text: Any) -> str | None:
    """UTC ``YYYY/MM/DD hh:mm:ss`` (D2) as ISO ``%Y-%m-%dT%H:%M:%SZ``; None for ``"0"``."""
    if not isinstance(text, str) or text == "0":
        return None
    try:
        stamp = datetime.strptime(text, "%Y/%m/%d %H:%M:%S").replace(tzinfo=UTC)
    except ValueError:
        return None
    return stamp.strftime("%Y-%m-%dT%H:%M:%SZ")


def api_task_item(item: dict[str, Any]) -> dict[str, Any]:
    """An ``upgrade_result`` item as the API shows it: zero-padded agent, ISO times."""
    out: dict[str, Any] = {
        "message": item.get("message", "Success"),
        "agent": f"{int(item['agent']):03d}",
    }
    for key in ("task_id", "node", "module", "command", "status", "error_msg", "progress"):
        if key in item:
            out[key] = item[key]
    for key in ("create_time", "update_time"):
        stamp = iso_time(item.get(key))
        if stamp is not None:
            out[key] = stamp
    return out


# --------------------------------------------------------------------------- query parsing


def query_of(request: web.Request, allowed: Sequence[str]) -> dict[str, str]:
    """The query parameters, refusing unknown and repeated ones."""
    query = request.query
    unknown = sorted(set(query) - set(allowed) - COMMON)
    if unknown:
        raise BadRequest(f"unknown query parameter(s): {', '.join(unknown)}")
    params: dict[str, str] = {}
    for key in query:
        values = query.getall(key)
        if len(values) > 1:
            raise BadRequest(f"parameter {key!r} is given more than once")
        params[key] = values[0]
    for flag in COMMON:
        if flag in params:
            boolean(params, flag)
    return params


def boolean(params: dict[str, str], name: str) -> bool:
    value = params.get(name)
    if value is None:
        return False
    if value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise BadRequest(f"parameter {name!r} must be true or false")


def agents_list(params: dict[str, str], required: bool) -> list[int] | None:
    """Agent ids of ``agents_list`` in order, without repeats; None for ``all`` or absent."""
    text = params.get("agents_list")
    if text is None:
        if required:
            raise BadRequest("parameter 'agents_list' is required")
        return None
    ids: list[int] = []
    every = False
    for part in text.split(","):
        if not _AGENT_ITEM.fullmatch(part):
            raise BadRequest(f"'agents_list' item {part!r} does not match ^(\\d+|all)$")
        if part == "all":
            every = True
        else:
            ids.append(int(part))
    return None if every else list(dict.fromkeys(ids))


def string(params: dict[str, str], name: str, max_length: int = 4096) -> str | None:
    value = params.get(name)
    if value is not None and len(value) > max_length:
        raise BadRequest(f"parameter {name!r} is longer than {max_length} characters")
    return value


def integer(params: dict[str, str], name: str, minimum: int, maximum: int) -> int | None:
    value = params.get(name)
    if value is None:
        return None
    if not re.fullmatch(r"[0-9]{1,15}", value) or not minimum <= int(value) <= maximum:
        raise BadRequest(f"parameter {name!r} must be an integer from {minimum} to {maximum}")
    return int(value)


# --------------------------------------------------------------------------- the API


class UpgradeApi:
    """Request handlers over a running ``Manager``."""

    def __init__(self, manager: Manager) -> None:
        self.manager = manager
        self.tokens = tuple(t.encode() for t in manager.config.api.tokens)

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self.errors, self.auth], client_max_size=1 << 16)
        app.router.add_get("/openapi.json", self.openapi)
        app.router.add_put("/agents/upgrade", self.upgrade)
        app.router.add_put("/agents/upgrade_custom", self.upgrade_custom)
        app.router.add_get("/agents/upgrade_result", self.upgrade_result)
        app.router.add_put("/agents/upgrade_cancel", self.upgrade_cancel)
        app.router.add_get("/tasks", self.tasks)
        return app

    # ---- middlewares

    @web.middleware
    async def errors(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        try:
            return await handler(request)
        except BadRequest as exc:
            return problem(400, "Bad Request", str(exc))
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            allow = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else {}
            return problem(exc.status, exc.reason, exc.reason, **allow)
        except Exception:
            log.exception("api: %s %s failed", request.method, request.path)
            return problem(500, "Internal Server Error", "see the manager's log")

    @web.middleware
    async def auth(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if request.path == "/openapi.json":
            return await handler(request)
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        given = token.strip().encode()
        if scheme.lower() != "bearer" or not given:
            return self._unauthorized("No bearer token given")
        matched = False
        for known in self.tokens:
            matched |= hmac.compare_digest(given, known)
        if not matched:
            return self._unauthorized("Invalid token")
        return await handler(request)

    @staticmethod
    def _unauthorized(detail: str) -> web.Response:
        return problem(401, "Unauthorized", detail, **{"WWW-Authenticate": "Bearer"})

    # ---- helpers

    async def _agents(self, ids: list[int] | None) -> tuple[list[int], dict[int, Any]]:
        """(the requested ids, or every known agent's; what the store knows of them)."""
        store = self.manager.store
        if ids is None:
            known = await asyncio.to_thread(store.list_agents)
            return [a.agent_id for a in known], {a.agent_id: a for a in known}
        found = await asyncio.to_thread(lambda: {i: store.get_agent(i) for i in set(ids)})
        return ids, {i: a for i, a in found.items() if a is not None}

    async def _create(self, command: str, params: dict[str, Any], ids: list[int] | None) -> Any:
        outcome = Outcome(
            "All upgrade tasks were created",
            "Some upgrade tasks were not created",
            "No upgrade task was created",
        )
        agents, known = await self._agents(ids)
        eligible = []
        for agent_id in agents:
            agent = known.get(agent_id)
            if agent_id == 0:
                outcome.fail(agent_id, *MANAGER_AGENT)
            elif agent is None:
                outcome.fail(agent_id, *AGENT_DOES_NOT_EXIST)
            elif not agent.active:
                outcome.fail(agent_id, *AGENT_NOT_ACTIVE)
            else:
                eligible.append(agent_id)
        for start in range(0, len(eligible), UPGRADE_CHUNK):
            chunk = eligible[start : start + UPGRADE_CHUNK]
            message = {
                "origin": {"module": "api"},
                "command": command,
                "parameters": {"agents": chunk, **params},
            }
            reply = await self.manager.service.handle_raw(dumps(message))
            if reply.get("error"):
                code = int(reply["error"])
                if code == UpgradeCode.PARSING_ERROR:
                    raise BadRequest(
                        "a parameter holds a character the upgrade module refuses "
                        "(NUL or an unpaired surrogate)"
                    )
                if code in (
                    UpgradeCode.PARSING_REQUIRED_PARAMETER,
                    UpgradeCode.TASK_CONFIGURATIONS,
                ):
                    # a parameter the module refuses (e.g. an installer with a path): the
                    # client's fault, answered 400 with the module's precise text
                    data = reply.get("data") or [{}]
                    raise BadRequest(str(data[0].get("message") or upgrade_message(code)))
                raise RuntimeError(f"upgrade module error {code}: {upgrade_message(code)}")
            for item in reply["data"]:
                code = int(item.get("error", 0))
                if code:
                    outcome.fail(int(item["agent"]), MODULE_BASE + code, str(item["message"]))
                else:
                    outcome.affected.append(
                        {"agent": f"{int(item['agent']):03d}", "task_id": item["task_id"]}
                    )
        return web.json_response(outcome.render())

    # ---- handlers

    async def openapi(self, request: web.Request) -> web.Response:
        return web.json_response(openapi_document())

    async def upgrade(self, request: web.Request) -> web.Response:
        allowed = (
            "agents_list",
            "upgrade_version",
            "wpk_repo",
            "use_http",
            "force",
            "package_type",
        )
        q = query_of(request, allowed)
        ids = agents_list(q, required=True)
        params: dict[str, Any] = {}
        version = q.get("upgrade_version")
        if version is not None:
            if not _VERSION.fullmatch(version):
                raise BadRequest(f"'upgrade_version' {version!r} is not a version like v4.9.1")
            params["version"] = versions.normalise(version)
        repo = string(q, "wpk_repo", 2048)
        if repo is not None:
            params["wpk_repo"] = repo
        params["use_http"] = boolean(q, "use_http")
        params["force_upgrade"] = boolean(q, "force")
        package_type = q.get("package_type")
        if package_type is not None:
            if package_type not in ("rpm", "deb"):
                raise BadRequest("'package_type' must be rpm or deb")
            params["package_type"] = package_type
        return await self._create("upgrade", params, ids)

    async def upgrade_custom(self, request: web.Request) -> web.Response:
        q = query_of(request, ("agents_list", "file_path", "installer"))
        ids = agents_list(q, required=True)
        file_path = string(q, "file_path", 4096)
        if not file_path:
            raise BadRequest("parameter 'file_path' is required")
        params: dict[str, Any] = {"file_path": file_path}
        installer = string(q, "installer", 255)
        if installer is not None:
            if not _INSTALLER.fullmatch(installer):
                raise BadRequest(f"'installer' {installer!r} is not an installer name")
            params["installer"] = installer
        return await self._create("upgrade_custom", params, ids)

    async def upgrade_result(self, request: web.Request) -> web.Response:
        q = query_of(request, ("agents_list",))
        agents, known = await self._agents(agents_list(q, required=False))
        outcome = Outcome(
            "All upgrade tasks were returned",
            "Some upgrade tasks were not returned",
            "No upgrade task was returned",
        )
        wanted = []
        for agent_id in agents:
            if agent_id == 0:
                outcome.fail(agent_id, *MANAGER_AGENT)
            elif agent_id not in known:
                outcome.fail(agent_id, *AGENT_DOES_NOT_EXIST)
            else:
                wanted.append(agent_id)
        for start in range(0, len(wanted), RESULT_CHUNK):
            for item in await self.manager.tasks.results(wanted[start : start + RESULT_CHUNK]):
                code = int(item.get("error", 0))
                if code:
                    outcome.fail(int(item["agent"]), MODULE_BASE + code, str(item["message"]))
                else:
                    outcome.affected.append(api_task_item(item))
        return web.json_response(outcome.render())

    async def upgrade_cancel(self, request: web.Request) -> web.Response:
        q = query_of(request, ("agents_list",))
        agents, known = await self._agents(agents_list(q, required=True))
        outcome = Outcome(
            "All upgrade tasks were cancelled",
            "Some upgrade tasks were not cancelled",
            "No upgrade task was cancelled",
        )
        wanted = []
        for agent_id in agents:
            if agent_id == 0:
                outcome.fail(agent_id, *MANAGER_AGENT)
            elif agent_id not in known:
                outcome.fail(agent_id, *AGENT_DOES_NOT_EXIST)
            else:
                wanted.append(agent_id)
        if wanted:
            for item in await self.manager.tasks.cancel_agents(wanted):
                code = int(item.get("error", 0))
                if code:
                    outcome.fail(int(item["agent"]), MODULE_BASE + code, str(item["message"]))
                else:
                    outcome.affected.append(
                        {"agent": f"{int(item['agent']):03d}", "task_id": item["task_id"]}
                    )
        return web.json_response(outcome.render())

    async def tasks(self, request: web.Request) -> web.Response:
        q = query_of(request, ("status", "agents_list", "node", "since", "until", "limit"))
        filters: dict[str, Any] = {}
        if "status" in q:
            words = q["status"].split(",")
            for word in words:
                if word not in _STATUS_WORDS:
                    raise BadRequest(f"'status' {word!r} is not one of {', '.join(_STATUS_WORDS)}")
            filters["statuses"] = words
        ids = agents_list(q, required=False)
        if ids is not None:
            filters["agents"] = ids
        node = string(q, "node", 255)
        if node is not None:
            filters["node"] = node
        for name in ("since", "until"):
            value = integer(q, name, 0, 2**40)
            if value is not None:
                filters[name] = value
        limit = integer(q, "limit", 0, 100000)
        filters["limit"] = 500 if limit is None else limit
        try:
            flt = parse_filter(filters)
        except AdminRequestError as exc:
            raise BadRequest(str(exc)) from None
        found = await asyncio.to_thread(self.manager.store.list_tasks, flt)
        outcome = Outcome(
            "All specified task's status were returned",
            "Some status were not returned",
            "No status was returned",
        )
        outcome.affected = [api_task_item(result_item(t.agent_id, t)) for t in found]
        return web.json_response(outcome.render())


# --------------------------------------------------------------------------- serving


class AccessLogger(AbstractAccessLogger):
    """Method, path (never the query string or headers), status and duration."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        access_log.info(
            "%s %s %s %d %.3fs",
            request.remote,
            request.method,
            request.path,
            response.status,
            time,
        )

    @property
    def enabled(self) -> bool:
        return access_log.isEnabledFor(logging.INFO)


class WebServer:
    """One running aiohttp site (the API or the metrics endpoint)."""

    def __init__(self, runner: web.AppRunner, name: str, on_close: Callable[[], None]) -> None:
        self.runner = runner
        self.name = name
        self._on_close = on_close

    @property
    def port(self) -> int:
        """The bound TCP port (useful with ``listen = "127.0.0.1:0"``)."""
        return int(self.runner.addresses[0][1])

    async def close(self) -> None:
        self._on_close()
        await self.runner.cleanup()
        log.info("%s server stopped", self.name)


async def serve_app(
    app: web.Application,
    listen: str,
    name: str,
    ssl_context: ssl.SSLContext | None = None,
    on_close: Callable[[], None] = lambda: None,
) -> WebServer:
    """Start ``app`` on ``listen`` (``host:port``) on the running loop."""
    host, port = split_listen(listen)
    runner = web.AppRunner(
        app,
        access_log_class=AccessLogger,
        handle_signals=False,
        max_line_size=MAX_REQUEST_LINE,
    )
    await runner.setup()
    site = web.TCPSite(runner, host, port, ssl_context=ssl_context)
    try:
        await site.start()
    except OSError:
        await runner.cleanup()
        raise
    server = WebServer(runner, name, on_close)
    scheme = "https" if ssl_context else "http"
    log.info("%s listening on %s://%s:%d", name, scheme, host, server.port)
    return server


def tls_context(config: ManagerConfig) -> ssl.SSLContext | None:
    """The API's server TLS context from ``[api] cert``/``key`` (relative to home); also
    what ``wpk-upgrade config check`` loads. ``PluginError`` naming both files."""
    api = config.api
    if not api.cert or not api.key:
        return None
    cert, key = config.home / Path(api.cert), config.home / Path(api.key)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(str(cert), str(key))
    except (OSError, ssl.SSLError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise PluginError(f"api: cannot load cert {cert} / key {key}: {reason}") from exc
    return context


async def start_api(manager: Manager) -> WebServer:
    """Serve the API of ``manager`` on ``[api] listen``."""
    return await serve_app(
        UpgradeApi(manager).app(), manager.config.api.listen, "api", tls_context(manager.config)
    )


__all__ = [
    "UpgradeApi",
    "WebServer",
    "openapi_document",
    "serve_app",
    "start_api",
]
