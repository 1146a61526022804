"""``/twarga/api/metrics``: host and VM readings and their history; ``/twarga/metrics``: the
Prometheus exposition for a scraper holding the scrape token (or an admin)."""

from __future__ import annotations

import hmac

from jupyter_server.auth.decorator import authorized
from jupyter_server.auth.identity import User
from prometheus_client import CONTENT_TYPE_LATEST
from tornado import web

from twarga_lab.errors import Forbidden
from twarga_lab.handlers.base import TwargaAPIHandler
from twarga_lab.schemas import HistoryQuery
from twarga_lab.services.metrics import clock


class HostMetricsHandler(TwargaAPIHandler):
    @web.authenticated
    @authorized
    async def get(self) -> None:
        self.write_json(await self.services.run(self.services.metrics.host_now))


class VMMetricsHandler(TwargaAPIHandler):
    @web.authenticated
    @authorized
    async def get(self, vm_id: str) -> None:
        vm = await self.services.vms.get(self.identity, int(vm_id))  # someone else's: 404
        self.write_json(await self.services.run(self.services.metrics.vm_now, vm))


class MetricsHistoryHandler(TwargaAPIHandler):
    @web.authenticated
    @authorized
    async def get(self) -> None:
        metrics = self.services.metrics
        # The seed's (Twarga Cloud's) names too: metric_type, hours, vm_id.
        query = HistoryQuery.from_query(
            self.query_args(HistoryQuery), now=clock(), max_window=metrics.max_window()
        )
        if query.entity == "vm":
            await self.services.vms.get(self.identity, query.entity_id)  # someone else's: 404
        self.write_json(await self.services.run(metrics.history, query))


class PrometheusHandler(TwargaAPIHandler):
    """A Prometheus server scrapes with ``Authorization: Bearer <metrics_scrape_token>``;
    without the token only an admin (by normal Jupyter or Hub authentication) may read."""

    _scraper = False

    async def prepare(self) -> None:
        token = self.services.metrics.scrape_token
        scheme, _, presented = self.request.headers.get("Authorization", "").partition(" ")
        if token and scheme.lower() == "bearer" and hmac.compare_digest(presented.strip(), token):
            # The scrape token is the whole authentication: no Hub round trip per scrape.
            self._scraper = True
            self.current_user = self._jupyter_current_user = User(username="prometheus")
            return
        await super().prepare()

    async def get(self) -> None:
        if self._scraper:
            self._write_exposition()
        else:
            await self._get_as_user()

    @web.authenticated
    @authorized
    async def _get_as_user(self) -> None:
        if not self.identity.admin:
            raise Forbidden("only admins or a scraper with the scrape token", "admin_required")
        self._write_exposition()

    def _write_exposition(self) -> None:
        body = self.services.metrics.prometheus_text()
        self.finish(body, set_content_type=CONTENT_TYPE_LATEST)


default_handlers = [
    (r"/twarga/api/metrics/host", HostMetricsHandler),
    (r"/twarga/api/metrics/vm/(?P<vm_id>\d+)", VMMetricsHandler),
    (r"/twarga/api/metrics/history", MetricsHistoryHandler),
    (r"/twarga/metrics", PrometheusHandler),
]
