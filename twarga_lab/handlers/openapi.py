"""``/twarga/api/openapi.json``: the OpenAPI 3.1 document of this API (``twarga_lab.openapi``),
built once from the route table, for anyone authenticated."""

from __future__ import annotations

from typing import Any

from jupyter_server.auth.decorator import authorized
from tornado import web

from twarga_lab.handlers.base import TwargaAPIHandler
from twarga_lab.openapi import build_document


class OpenAPIHandler(TwargaAPIHandler):
    _documents: dict[str, dict[str, Any]] = {}

    @web.authenticated
    @authorized
    async def get(self) -> None:
        base = self.base_url
        document = self._documents.get(base)
        if document is None:
            from twarga_lab.handlers import ROUTES  # the table imports this module

            document = self._documents[base] = build_document(ROUTES, base)
        self.write_json(document)


default_handlers = [(r"/twarga/api/openapi.json", OpenAPIHandler)]
