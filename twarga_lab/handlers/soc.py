"""``/twarga/api/soc``: the security-event log, its exports, bans and statistics."""

from __future__ import annotations

from jupyter_server.auth.decorator import authorized
from tornado import web

from twarga_lab.handlers.base import TwargaAPIHandler
from twarga_lab.services.soc import EventQuery

QUERY_PARAMS = ("limit", "severity", "type", "vm_id", "since_id", "before_id")
EXPORTS = {
    "csv": "text/csv; charset=utf-8",
    "jsonl": "application/x-ndjson; charset=utf-8",
}


EXPORT_MAX_ROWS = 10_000_000  # an export streams page by page, so it may be long


class SocHandler(TwargaAPIHandler):
    def event_query(self, *, default_limit: int = 100, max_limit: int = 1000) -> EventQuery:
        """The listing's filters from the query string (``limit=all``: ``max_limit``)."""
        params = {name: self.get_argument(name, None) for name in QUERY_PARAMS}
        if params["limit"] == "all":
            params["limit"] = str(max_limit)
        return EventQuery.from_params(params, default_limit=default_limit, max_limit=max_limit)


class EventsHandler(SocHandler):
    @web.authenticated
    @authorized
    async def get(self) -> None:
        query = self.event_query()
        soc = self.services.soc
        self.write_json(await self.services.run(soc.list_events, self.identity, query))


class EventsExportHandler(SocHandler):
    """The same events as a download; ``limit`` defaults to 10,000 (``all``: every event,
    up to 10 million). The body is streamed: each page of 1,000 rows is read and formatted
    in a worker thread, written and flushed before the next is read."""

    fmt = "csv"

    @web.authenticated
    @authorized
    async def get(self) -> None:
        query = self.event_query(default_limit=10_000, max_limit=EXPORT_MAX_ROWS)
        fmt = self.fmt
        self.set_header("Content-Type", EXPORTS[fmt])
        self.set_header("Content-Disposition", f'attachment; filename="twarga-events.{fmt}"')
        async for chunk in self.services.soc.export(self.identity, query, fmt):
            self.write(chunk)
            await self.flush()
        self.finish()


class EventsJSONLinesHandler(EventsExportHandler):
    fmt = "jsonl"


class StatisticsHandler(SocHandler):
    @web.authenticated
    @authorized
    async def get(self) -> None:
        soc = self.services.soc
        self.write_json(await self.services.run(soc.statistics, self.identity))


class BansHandler(SocHandler):
    @web.authenticated
    @authorized
    async def get(self) -> None:
        soc = self.services.soc
        self.write_json(await self.services.run(soc.list_bans, self.identity))


default_handlers = [
    (r"/twarga/api/soc/events", EventsHandler),
    # An unescaped dot keeps the route table's paths literal (the route test walks them).
    (r"/twarga/api/soc/events.csv", EventsExportHandler),
    (r"/twarga/api/soc/events.jsonl", EventsJSONLinesHandler),
    (r"/twarga/api/soc/statistics", StatisticsHandler),
    (r"/twarga/api/soc/bans", BansHandler),
]
