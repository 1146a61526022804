"""A fake of JupyterHub's identity for the fast test layer.

It answers like ``jupyterhub.singleuser``'s identity provider does (a user carrying the
Hub's model with ``name`` and ``admin``), from fixed tokens, so API tests can act as
several people against one in-process server.
"""

from __future__ import annotations

from jupyter_server.auth.identity import IdentityProvider, User
from tornado import web

TOKENS = {
    "alice-token": ("alice", False),
    "bob-token": ("bob", False),
    "admin-token": ("admin", True),
}


def auth(token: str) -> dict[str, str]:
    """The Authorization header for one of the fixed tokens."""
    return {"Authorization": f"token {token}"}


class FakeHubIdentityProvider(IdentityProvider):
    """Users from fixed tokens, shaped like the Hub's (``user.hub_user``)."""

    def get_user(self, handler: web.RequestHandler) -> User | None:
        scheme, _, token = handler.request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "token" or token not in TOKENS:
            return None
        name, admin = TOKENS[token]
        # Token-authenticated requests skip the XSRF check, as with the real providers.
        handler._token_authenticated = True  # type: ignore[attr-defined]
        user = User(username=name, name=name)
        user.hub_user = {"name": name, "admin": admin}  # type: ignore[attr-defined]
        return user
