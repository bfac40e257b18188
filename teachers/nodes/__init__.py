"""The teacher node types: one module each (its config and its adapter), registered by key.

Importing this package imports every module in it, so each registers itself with
``distillery.teachers.base.register_node``: a new node type is one new file here, and no other
file changes. (Only this package's own modules are imported; a spec never names code.)
"""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
