"""Configuration of each user's own JupyterLab server under the Hub."""

c = get_config()  # type: ignore[name-defined]  # noqa: F821

# The VM console is a user's terminal: no shell on the host from their server.
c.ServerApp.terminals_enabled = False
# This machine reaches no news feed or update server: don't ask users about them.
c.LabApp.news_url = None
c.LabApp.check_for_updates_class = "jupyterlab.handlers.announcements.NeverCheckForUpdate"
# news_url = None stops fetching, but JupyterLab still asks "Would you like to get notified
# about official Jupyter news?". The plugin that asks (and shows news and updates, both off
# above) is disabled in jupyter-config/labconfig/page_config.json, which the package
# installs into the environment's etc/jupyter (personal mode gets it too).
# A browser session that logged out or was revoked (a disabled account, a reset password)
# stops working here within seconds; JupyterHub's default believes the Hub's answer 300 s.
c.HubOAuth.cache_max_age = 5
