"""The hypervisor layer: no tornado, no database. Services drive it through
:class:`~twarga_lab.virt.backend.HypervisorBackend`."""
