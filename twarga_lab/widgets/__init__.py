"""Notebook dashboards of Twarga Lab: one composite widget per panel, on the Python API
(:mod:`twarga_lab.client`).

    >>> from twarga_lab.client import Lab
    >>> from twarga_lab.widgets import VMDashboard
    >>> dash = VMDashboard(Lab())
    >>> dash.start()          # live refresh; dash.stop() ends it
    >>> dash

- :class:`VMDashboard`: my VMs, their actions, my labs (:class:`LabsSection`: each lab's
  VMs and networks, lab actions, a lab from a template), a create form, credits and quota.
- :class:`MonitorDashboard`: host and VM metrics as live charts, 1 hour to 7 days.
- :class:`SOCFeed`: the security-event log, filters, statistics and timeline.
- :class:`AdminPanel`: users, credits, quotas and every VM (admins).
- :class:`ConsoleWidget`: a VM's serial console (``vm.console()``).
"""

from twarga_lab.widgets.admin import AdminPanel
from twarga_lab.widgets.base import LivePanel
from twarga_lab.widgets.console import ConsoleWidget
from twarga_lab.widgets.labs import LabsSection
from twarga_lab.widgets.monitor import MonitorDashboard
from twarga_lab.widgets.soc import SOCFeed
from twarga_lab.widgets.vms import VMActionBar, VMDashboard

__all__ = [
    "AdminPanel",
    "ConsoleWidget",
    "LabsSection",
    "LivePanel",
    "MonitorDashboard",
    "SOCFeed",
    "VMActionBar",
    "VMDashboard",
]
