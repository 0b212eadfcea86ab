"""The method registry: a method registers itself with one call, and nothing else names it.

    @register_method
    class MyMethod(Algorithm):
        name = "mine"
        Options = MyMethodOptions
        ...

A module of `fedlora.algorithms` is found by `fedlora.algorithms` itself (every module in the
package is imported); a method outside the package registers when its module is imported: by
the user's own code, or by any installed package that declares it under the `fedlora.methods`
entry-point group (`[project.entry-points."fedlora.methods"] mine = "my_pkg.my_method"`), which
`fedlora.algorithms` loads, so `fedlora run`, `compare` and the Flower apps know it. Everything
else (the config's `algorithm:` section, the cost table, `compare`'s defaults) reads the
registry and the traits the method class declares (`base.Algorithm`).
"""

from __future__ import annotations

import logging
from importlib.metadata import entry_points
from typing import Any, TypeVar

from pydantic import GetCoreSchemaHandler, GetJsonSchemaHandler
from pydantic_core import core_schema

from fedlora.algorithms.base import Algorithm, FederationSetup, MethodOptions

log = logging.getLogger("fedlora")

ENTRY_POINT_GROUP = "fedlora.methods"
ALGORITHMS: dict[str, type[Algorithm]] = {}
"""Method name → its Algorithm class, in registration order."""

A = TypeVar("A", bound=type[Algorithm])


def register_method(cls: A) -> A:
    """Make `cls` a method: `algorithm: {name: cls.name, ...}` in a config builds it with its
    `Options`. Usable as a class decorator; registering the same class twice is harmless, a
    second class under a taken name is refused (a method cannot be shadowed by accident)."""
    if not (isinstance(cls, type) and issubclass(cls, Algorithm)):
        raise TypeError(f"register_method: {cls!r} is not an Algorithm subclass")
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise TypeError(f"register_method: {cls.__name__} has no `name`")
    options = getattr(cls, "Options", None)
    if not (isinstance(options, type) and issubclass(options, MethodOptions)):
        raise TypeError(f"register_method: {cls.__name__}.Options must be a MethodOptions subclass")
    field = options.model_fields.get("name")
    if field is None or field.default != name:
        raise TypeError(f"register_method: {options.__name__}.name must default to {name!r}")
    known = ALGORITHMS.get(name)
    if known is not None and known is not cls:
        raise ValueError(f"register_method: the name {name!r} is taken by {known.__module__}.{known.__name__}")
    ALGORITHMS[name] = cls
    return cls


def load_entry_points() -> None:
    """Import the methods installed packages declare (group `fedlora.methods`). A broken plugin
    is one warning naming it, not a failure of every command."""
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            loaded = ep.load()
            if isinstance(loaded, type) and issubclass(loaded, Algorithm):
                register_method(loaded)
        except Exception as err:  # noqa: BLE001 - someone else's code: report, keep going
            log.warning("method plugin %s = %s not loaded: %s", ep.name, ep.value, err)


def parse_options(value: Any) -> MethodOptions:
    """A config's `algorithm:` mapping → the options of the method its `name` names."""
    if isinstance(value, MethodOptions):
        value = value.model_dump()
    if not isinstance(value, dict):
        raise ValueError(f"expected a mapping with name: <method>, got {type(value).__name__}")
    name = value.get("name")
    if not isinstance(name, str) or name not in ALGORITHMS:  # a list or mapping is not even hashable
        raise ValueError(f"unknown method {name!r}; choose from {sorted(ALGORITHMS)}")
    return ALGORITHMS[name].Options.model_validate(value)


class RegisteredOptions:
    """The type of a config's `algorithm:` section: whichever registered method's options its
    `name` selects (a union of the registry at validation time, so a method registered after
    this module loaded is accepted too). Dumps as that method's options (pydantic serialises the
    value by its own model)."""

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: GetCoreSchemaHandler) -> core_schema.CoreSchema:
        return core_schema.no_info_plain_validator_function(parse_options)

    @classmethod
    def __get_pydantic_json_schema__(cls, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler) -> dict:
        """One alternative per registered method (for the generated configuration reference)."""
        return {"oneOf": [handler(m.Options.__pydantic_core_schema__) for m in ALGORITHMS.values()]}


def build_algorithm(options: MethodOptions, setup: FederationSetup) -> Algorithm:
    return ALGORITHMS[options.name](options, setup)
