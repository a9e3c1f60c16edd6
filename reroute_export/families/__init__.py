"""Model families: one module per family (llava.py, qwen2_5_vl.py), each declaring one
`Family` (base.py) with @register_family; host.py holds the numpy/PIL image steps they share.

Nothing is imported at package import, so code that only needs the `Family` interface
(routing, rewrite, export) pulls no family in. The lookup below first imports every
module of this package, once: adding a family is one new file here plus its graph spec.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil

from ..errors import UserError
from .base import REGISTERED, Family


@functools.cache
def _import_all() -> None:
    """Import every module of the package: each family module registers on import."""
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")


def families() -> dict[str, type[Family]]:
    _import_all()
    return dict(REGISTERED)


def get_family(name: str) -> type[Family]:
    known = families()
    if name not in known:
        raise UserError(f"unknown family {name!r}; known: {', '.join(known)}")
    return known[name]


def family_for_architecture(arch: str) -> type[Family]:
    for fam in families().values():
        if arch in fam.architectures:
            return fam
    supported = sorted(a for f in families().values() for a in f.architectures)
    raise UserError(f"unsupported architecture {arch}; supported: {', '.join(supported)}")
