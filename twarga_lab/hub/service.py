"""Glue for the ``twarga`` Hub service (a jupyterhub-singleuser server)."""

from __future__ import annotations

from typing import Any

from jupyterhub.singleuser.extension import JupyterHubAuthorizer

ALLOWED_RESOURCES = frozenset({"twarga"})


class TwargaServiceAuthorizer(JupyterHubAuthorizer):
    """Hub scopes as usual, and nothing but Twarga's own API.

    Kernels, contents, terminals, sessions and every other jupyter_server resource are
    refused, so the privileged service never gives a user a shell or files on the host.
    """

    def is_authorized(self, handler: Any, user: Any, action: str, resource: str) -> bool:
        if resource not in ALLOWED_RESOURCES:
            return False
        return bool(super().is_authorized(handler, user, action, resource))
