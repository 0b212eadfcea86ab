"""Federated LoRA methods, one module each, behind the protocol in `base`.

Importing this package registers every method: each module here registers its own class
(`registry.register_method`), and installed packages' methods come from the `fedlora.methods`
entry points. Adding a method is one new module, here or in any package.
"""

from __future__ import annotations

import importlib
import pkgutil

from fedlora.algorithms.base import Algorithm, FederationSetup, MethodOptions
from fedlora.algorithms.registry import (
    ALGORITHMS,
    RegisteredOptions,
    build_algorithm,
    load_entry_points,
    register_method,
)

AlgorithmOptions = RegisteredOptions
"""The `algorithm:` section's type: the options of any registered method (by its `name`)."""

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
load_entry_points()

__all__ = ["ALGORITHMS", "Algorithm", "AlgorithmOptions", "FederationSetup", "MethodOptions",
           "build_algorithm", "register_method"]
