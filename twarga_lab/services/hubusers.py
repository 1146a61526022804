"""What the Hub knows about its users (the admin flag), asked with the service's token."""

from __future__ import annotations

import logging
import time
from urllib.parse import quote

import httpx

log = logging.getLogger(__name__)


class HubUserDirectory:
    """Reads ``GET {api_url}/users/{name}`` and caches the admin flag for ``ttl`` seconds.

    If the Hub cannot be reached, the last known answer stands; a user never seen is not
    an admin.
    """

    def __init__(self, api_url: str, token: str, ttl: float = 15.0) -> None:
        self.api_url = api_url.rstrip("/")
        self.token = token
        self.ttl = ttl
        self._cache: dict[str, tuple[float, bool]] = {}
        self._client = httpx.AsyncClient(timeout=10.0, headers={"Authorization": f"token {token}"})

    async def is_admin(self, name: str) -> bool:
        """Whether the Hub says ``name`` is an admin."""
        cached = self._cache.get(name)
        now = time.monotonic()
        if cached is not None and now - cached[0] < self.ttl:
            return cached[1]
        try:
            response = await self._client.get(f"{self.api_url}/users/{quote(name, safe='')}")
            response.raise_for_status()
            admin = bool(response.json().get("admin"))
        except (httpx.HTTPError, ValueError) as e:
            log.warning("cannot read %s from the Hub: %s", name, e)
            return cached[1] if cached else False
        self._cache[name] = (now, admin)
        return admin

    async def group_members(self, group: str) -> list[str]:
        """The members of Hub group ``group`` ([] when there is no such group)."""
        try:
            response = await self._client.get(f"{self.api_url}/groups/{quote(group, safe='')}")
            if response.status_code == 404:
                return []
            response.raise_for_status()
            return sorted(str(name) for name in response.json().get("users", []))
        except (httpx.HTTPError, ValueError) as e:
            log.warning("cannot read group %s from the Hub: %s", group, e)
            return []

    async def close(self) -> None:
        await self._client.aclose()
