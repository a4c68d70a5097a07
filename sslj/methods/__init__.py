"""One module per method, each registering itself (`base.register`).

`get(name)` and `registry()` import every module of this package once, so a
new method is found by writing its module: there is no table to edit.
"""

from __future__ import annotations

import importlib
import pkgutil

from sslj.errors import UserError
from sslj.methods import base

_imported = False


def registry() -> dict[str, base.Definition]:
  """Every registered method, by name, in name order."""
  global _imported
  if not _imported:
    for info in pkgutil.iter_modules(__path__):
      importlib.import_module(f'{__name__}.{info.name}')
    _imported = True
  return dict(sorted(base.registered().items()))


def names() -> tuple[str, ...]:
  return tuple(registry())


def get(name: str) -> base.Definition:
  """The method a config's `method` field names; UserError if none is registered so."""
  methods = registry()
  if name not in methods:
    raise UserError(f"method '{name}' is unknown; known methods: {', '.join(methods)}.")
  return methods[name]
