"""Labs: several VMs on private networks of their own, made and graded as one."""

from twarga_lab.services.labs.service import LabService

__all__ = ["LabService"]
