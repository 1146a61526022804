"""Configuration of each user's own JupyterLab server under the Hub."""

c = get_config()  # type: ignore[name-defined]  # noqa: F821

# The VM console is a user's terminal: no shell on the host from their server.
c.ServerApp.terminals_enabled = False
# This machine reaches no news feed or update server: don't ask users about them.
c.LabApp.news_url = None
c.LabApp.check_for_updates_class = "jupyterlab.handlers.announcements.NeverCheckForUpdate"
