"""The base of every Twarga API handler: identity, JSON bodies, errors as JSON."""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING, Any

from jupyter_server.base.handlers import APIHandler
from jupyter_server.extension.handler import ExtensionHandlerMixin
from tornado import web

from twarga_lab.db.session import unavailable
from twarga_lab.errors import (
    InvalidRequest,
    NotFound,
    PayloadTooLarge,
    TwargaError,
    Unauthorized,
)
from twarga_lab.schemas import MAX_INT, Request
from twarga_lab.services import Identity

if TYPE_CHECKING:  # app imports the handlers: a runtime import would be a circle
    from twarga_lab.app import Services

# Query parameters whose values never reach a log line.
_SECRET_PARAMS = re.compile(r"(?i)([?&](?:token|_xsrf|access_token)=)[^&#]*")


def scrub_uri(uri: str) -> str:
    """``uri`` with the values of token-like query parameters replaced by ``[secret]``."""
    return _SECRET_PARAMS.sub(r"\1[secret]", uri)


class ScrubbedLogMixin:
    """Tornado writes ``request.uri`` into the warning of every HTTP error: a token a
    script put in the URL would land in the Hub's log. Log the scrubbed URI instead."""

    request: Any

    def _request_summary(self) -> str:
        return f"{self.request.method} {scrub_uri(self.request.uri)} ({self.request.remote_ip})"


class TwargaAPIHandler(ScrubbedLogMixin, ExtensionHandlerMixin, APIHandler):
    """Thin handlers: authenticate, parse, call one service method, write JSON."""

    auth_resource = "twarga"

    async def prepare(self) -> None:
        await super().prepare()
        if self.current_user is None:
            # 401 says "log in"; jupyter_server's default 403 would say "not allowed".
            raise Unauthorized("authentication required: send a token or log in")
        self._identity = await self.services.identify(self.current_user)
        limit = self.settings.get("twarga_lab_max_body_bytes", 64 * 1024)
        if len(self.request.body or b"") > limit:
            # Refused before json.loads: decoding megabytes would stall everyone's requests.
            raise PayloadTooLarge(
                f"the request body may be at most {limit} bytes", "body_too_large"
            )
        for name, value in self.path_kwargs.items():
            # An id past the database's integers names nothing: 404, not a driver overflow.
            if name.endswith("_id") and value.isdigit() and int(value) > MAX_INT:
                raise NotFound(f"{name.removesuffix('_id')} {value} does not exist", "not_found")

    @property
    def services(self) -> Services:
        """The services the extension built."""
        return self.settings["twarga_lab_services"]

    _identity: Identity | None = None

    @property
    def identity(self) -> Identity:
        """The Hub or Jupyter user behind this request, and whether they are an admin."""
        assert self._identity is not None, "identity is resolved in prepare()"
        return self._identity

    def json_body(self) -> Any:
        """The request's decoded JSON body (``{}`` when empty), for a schema's
        ``from_body``; 400 ``bad_json`` when it is not JSON."""
        raw = self.request.body
        if not raw:
            return {}
        try:
            return json.loads(raw)
        except ValueError:
            raise InvalidRequest("the request body is not valid JSON", "bad_json") from None

    def query_args(self, schema: type[Request]) -> dict[str, str | None]:
        """The query arguments ``schema`` reads (its fields and the seed's aliases), each
        its last value or None, for the schema's ``from_query``."""
        return {name: self.get_argument(name, None) for name in schema.wire_names()}

    def write_json(self, data: Any, status: int = 200) -> None:
        """Finish with ``data`` as JSON."""
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(data, default=str))

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        """Every error is JSON ``{"message", "reason"}``; domain errors pick the status."""
        exc_info = kwargs.get("exc_info")
        error = exc_info[1] if exc_info else None
        if error is not None:  # a database that is down, also outside Database.session
            error = unavailable(error) or error
        if isinstance(error, TwargaError):
            self.set_status(error.status_code)
            body: dict[str, Any] = {"message": error.message, "reason": error.reason}
            body.update({k: v for k, v in error.details.items() if v is not None})
            self.set_header("Content-Type", "application/json")
            self.finish(json.dumps(body, default=str))
            return
        if isinstance(error, web.HTTPError):
            message = error.log_message % error.args if error.log_message else None
            self.set_header("Content-Type", "application/json")
            self.finish(
                json.dumps(
                    {
                        "message": message or self._reason,
                        "reason": (error.reason or self._reason).lower().replace(" ", "_"),
                    }
                )
            )
            return
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps({"message": "internal server error", "reason": "internal_error"}))

    def log_exception(self, typ: Any, value: Any, tb: Any) -> None:
        # A domain error is an answer, not a crash: no traceback in the log.
        value = unavailable(value) or value
        if isinstance(value, TwargaError):
            self.log.info(
                "%s %s: %s (%s)",
                self.request.method,
                self.request.path,
                value.message,
                value.reason,
            )
            return
        super().log_exception(typ, value, tb)
