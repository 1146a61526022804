"""Labs: sets of VMs made from a template and joined by private networks.

``template`` reads and checks lab templates (``twarga-lab-template/v1``) and expands them
into machine instances; ``templates/`` holds the templates shipped with Twarga Lab.
"""

from __future__ import annotations

from pathlib import Path

from twarga_lab.labs.template import (
    TEMPLATE_SCHEMA,
    TEMPLATE_SCHEMA_ID,
    CheckTemplate,
    LabTemplate,
    MachineInstance,
    NICInstance,
    TemplateCatalogue,
    load_schema,
    parse_template,
)

__all__ = [
    "SHIPPED_TEMPLATES",
    "TEMPLATE_SCHEMA",
    "TEMPLATE_SCHEMA_ID",
    "CheckTemplate",
    "LabTemplate",
    "MachineInstance",
    "NICInstance",
    "TemplateCatalogue",
    "load_schema",
    "parse_template",
]

#: The folder of the templates shipped with the package (attack-defend, web-db).
SHIPPED_TEMPLATES = Path(__file__).parent / "templates"
