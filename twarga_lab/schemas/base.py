"""What every typed request is made of: fields that describe themselves, the JSON type check
of request bodies and the ``UNSET`` marker of a PATCH field that was not sent.

A request schema is a frozen dataclass deriving from :class:`Request`; each of its fields
carries ``metadata=wire(...)``: the JSON types the field accepts on the wire, a sentence for
people and the seed's (Twarga Cloud's) aliases. :meth:`Request.describe` lists
them, for the OpenAPI document that will be generated from these modules.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass
from typing import Any, ClassVar

from twarga_lab.errors import InvalidRequest

JSONTypes = type | tuple[type, ...]

# JSON types by name, for exact 400 messages ("'ram' must be an integer").
TYPE_NAMES: dict[type, str] = {
    str: "a string",
    int: "an integer",
    float: "a number",
    bool: "a boolean",
    dict: "an object",
    list: "an array",
}
# The same types as JSON Schema names them (for ``describe``).
SCHEMA_TYPES: dict[type, str] = {
    str: "string",
    int: "integer",
    float: "number",
    bool: "boolean",
    dict: "object",
    list: "array",
    type(None): "null",
}


class Unset(enum.Enum):
    """The type of ``UNSET``."""

    UNSET = "unset"

    def __repr__(self) -> str:
        return "UNSET"


# The largest id or limit the database can hold: its INTEGER columns are 32-bit in
# PostgreSQL (and SQLite's 64-bit ones overflow on anything past 2**63). A larger number
# is refused (422, or 404 for an id in a path) instead of failing in the driver (500).
MAX_INT = 2**31 - 1

# A PATCH field the body did not name (``None`` there means "back to the default").
UNSET = Unset.UNSET


def wire(
    doc: str,
    types: JSONTypes,
    *,
    name: str | None = None,
    aliases: tuple[str, ...] = (),
    default: Any = None,
    internal: bool = False,
) -> dict[str, Any]:
    """The metadata of a schema field (``field(metadata=wire(...))``): the JSON ``types``
    it accepts, ``doc`` for people, its ``name`` on the wire when that is not the field's,
    the seed's names for it (``aliases``) and what an absent value means when the field has
    no default of that kind (``default``, such as ``"-1h"`` for a time parsed into
    seconds). ``internal`` fields are derived while parsing and are not part of the API."""
    return {
        "doc": doc,
        "types": types,
        "wire": name,
        "aliases": aliases,
        "wire_default": default,
        "internal": internal,
    }


@dataclass(frozen=True)
class FieldDoc:
    """One field of a request as the API documents it."""

    name: str
    types: tuple[str, ...]
    required: bool
    default: Any
    doc: str
    aliases: tuple[str, ...] = ()


@dataclass(frozen=True)
class Request:
    """The base of every request schema: describing fields and checking body types."""

    # Where the fields travel: the JSON body or the query string.
    location: ClassVar[str] = "body"
    # The wire names a request must carry (a field with a default may still be required:
    # a PATCH of ``ssh_public_key`` must name it, even as null; a field without one may be
    # optional on the wire: ``since`` is parsed into seconds from ``-1h`` by default).
    required: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def describe(cls) -> list[FieldDoc]:
        """The request's fields as the API names, types and documents them."""
        docs = []
        for f in dataclasses.fields(cls):
            if f.metadata.get("internal", True):
                continue
            options = f.metadata["types"]
            options = options if isinstance(options, tuple) else (options,)
            name = f.metadata["wire"] or f.name
            default = f.metadata["wire_default"]
            if default is None and f.default not in (dataclasses.MISSING, UNSET):
                default = f.default
            docs.append(
                FieldDoc(
                    name=name,
                    types=tuple(SCHEMA_TYPES[t] for t in options),
                    required=name in cls.required,
                    default=default,
                    doc=f.metadata["doc"],
                    aliases=f.metadata["aliases"],
                )
            )
        return docs

    @classmethod
    def wire_names(cls) -> tuple[str, ...]:
        """Every name the request reads: its fields' wire names, then the seed's aliases."""
        docs = cls.describe()
        return (*(d.name for d in docs), *(a for d in docs for a in d.aliases))

    @classmethod
    def body_types(cls) -> dict[str, JSONTypes]:
        """Wire name -> accepted JSON types, aliases included (for :func:`check_types`)."""
        types: dict[str, JSONTypes] = {}
        for f in dataclasses.fields(cls):
            if f.metadata.get("internal", True):
                continue
            for name in (f.metadata["wire"] or f.name, *f.metadata["aliases"]):
                types[name] = f.metadata["types"]
        return types

    @classmethod
    def checked_body(cls, body: object) -> dict[str, Any]:
        """``body`` checked against the fields' types and ``required`` (400 if not)."""
        return check_types(body, cls.body_types(), cls.required)


def check_types(
    body: object, types: dict[str, JSONTypes], required: tuple[str, ...] = ()
) -> dict[str, Any]:
    """Check a decoded JSON body against a key -> type map; InvalidRequest (400) if not."""
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object", "bad_body")
    unknown = sorted(set(body) - set(types))
    if unknown:
        raise InvalidRequest(f"unknown field {unknown[0]!r}", "unknown_field")
    for key in required:
        if key not in body:
            raise InvalidRequest(f"{key!r} is required", "missing_field")
    for key, value in body.items():
        expected = types[key]
        options = expected if isinstance(expected, tuple) else (expected,)
        # bool is an int in Python, never in a JSON API.
        ok = isinstance(value, options) and not (isinstance(value, bool) and bool not in options)
        if int in options and isinstance(value, float) and float not in options:
            ok = False
        if not ok:
            names = " or ".join(TYPE_NAMES.get(t, t.__name__) for t in options)
            raise InvalidRequest(f"{key!r} must be {names}", "bad_type")
    return body
