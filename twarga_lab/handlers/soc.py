"""``/twarga/api/soc``: the security-event log, its exports, bans and statistics."""

from __future__ import annotations

from jupyter_server.auth.decorator import authorized
from tornado import web

from twarga_lab.handlers.base import TwargaAPIHandler
from twarga_lab.schemas import EventQuery

EXPORTS = {
    "csv": "text/csv; charset=utf-8",
    "jsonl": "application/x-ndjson; charset=utf-8",
}


class EventsHandler(TwargaAPIHandler):
    @web.authenticated
    @authorized
    async def get(self) -> None:
        query = EventQuery.from_query(self.query_args(EventQuery))
        soc = self.services.soc
        self.write_json(await self.services.run(soc.list_events, self.identity, query))


class EventsExportHandler(TwargaAPIHandler):
    """The same events as a download; ``limit`` defaults to 10,000 (``all``: every event,
    up to 10 million). The body is streamed: each page of 1,000 rows is read and formatted
    in a worker thread, written and flushed before the next is read."""

    fmt = "csv"

    @web.authenticated
    @authorized
    async def get(self) -> None:
        query = EventQuery.from_export_query(self.query_args(EventQuery))
        fmt = self.fmt
        self.set_header("Content-Type", EXPORTS[fmt])
        self.set_header("Content-Disposition", f'attachment; filename="twarga-events.{fmt}"')
        async for chunk in self.services.soc.export(self.identity, query, fmt):
            self.write(chunk)
            await self.flush()
        # APIHandler.finish labels the body JSON unless told: an empty export is sent here.
        self.finish(set_content_type=EXPORTS[fmt])


class EventsJSONLinesHandler(EventsExportHandler):
    fmt = "jsonl"


class StatisticsHandler(TwargaAPIHandler):
    @web.authenticated
    @authorized
    async def get(self) -> None:
        soc = self.services.soc
        self.write_json(await self.services.run(soc.statistics, self.identity))


class BansHandler(TwargaAPIHandler):
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
