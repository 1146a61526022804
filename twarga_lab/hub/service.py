"""Glue for the ``twarga`` Hub service (a jupyterhub-singleuser server)."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from jupyterhub.singleuser.extension import JupyterHubAuthorizer

ALLOWED_RESOURCES = frozenset({"twarga"})


def foreign_page(handler: Any) -> str | None:
    """Why a cookie-authenticated request comes from a page that may not use the cookie,
    or None.

    A browser attaches the Hub's cookie to any request for the service's address, so a
    page from somewhere else could act as whoever is logged in. Refused: an ``Origin`` or
    ``Referer`` that is not the service's own address (another site, or with
    ``subdomain_host`` another user's server, ``<name>.<host>``), and a ``Referer`` under
    ``<base>/user/``: a page served by someone's own server on the same origin. (On one
    origin a page can hide its ``Referer``: only ``subdomain_host`` separates users' pages
    completely; see the README.)
    """
    request = handler.request
    own = request.host.lower()  # host[:port] the browser addressed (scheme: a TLS proxy)
    origin = request.headers.get("Origin")
    if origin is not None and urlsplit(origin.lower()).netloc != own:
        return f"Origin {origin!r}"
    referer = request.headers.get("Referer")
    if referer:
        parts = urlsplit(referer)
        if parts.netloc.lower() != own:
            return f"Referer {referer!r}"
        base = handler.base_url.partition("services/")[0]  # the Hub's base URL
        if parts.path.startswith(f"{base}user/"):
            return f"Referer {referer!r} (a user's server)"
    return None


class TwargaServiceAuthorizer(JupyterHubAuthorizer):
    """Hub scopes as usual, and nothing but Twarga's own API.

    Kernels, contents, terminals, sessions and every other jupyter_server resource are
    refused, so the privileged service never gives a user a shell or files on the host.
    A request carrying the Hub's cookie rather than a token is refused when it comes from
    another origin's page or a user's server's page (:func:`foreign_page`).
    """

    def is_authorized(self, handler: Any, user: Any, action: str, resource: str) -> bool:
        if resource not in ALLOWED_RESOURCES:
            return False
        if not getattr(handler, "_token_authenticated", False):
            why = foreign_page(handler)
            if why is not None:
                handler.log.warning(
                    "Refused a cookie request to %s from %s", handler.request.path, why
                )
                return False
        return bool(super().is_authorized(handler, user, action, resource))
