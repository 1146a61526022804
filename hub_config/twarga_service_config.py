"""Configuration of the ``twarga`` Hub service (a jupyterhub-singleuser server).

It serves only Twarga's API: no JupyterLab, no terminals, no kernels, no contents. The
authorizer refuses every resource that is not Twarga's, so even a handler a future
extension adds cannot hand a user the host.
"""

c = get_config()  # type: ignore[name-defined]  # noqa: F821

c.ServerApp.jpserver_extensions = {
    "twarga_lab": True,
    "jupyterlab": False,
    "jupyter_lsp": False,
    "jupyter_server_terminals": False,
    "notebook_shim": False,
    "notebook": False,
    "nbclassic": False,
    "voila": False,
}
c.ServerApp.terminals_enabled = False
c.ServerApp.authorizer_class = "twarga_lab.hub.service.TwargaServiceAuthorizer"
c.ServerApp.allow_remote_access = False
c.ServerApp.open_browser = False
c.ServerApp.allow_root = True  # the service is the privileged account by design
# How long the service believes a token or cookie the Hub accepted (JupyterHub's default
# is 300 s): a revoked token (logout, a disabled account, a reset password) stops working
# here within seconds. Disabled accounts are also refused from Twarga's DB on every request.
c.HubOAuth.cache_max_age = 5
