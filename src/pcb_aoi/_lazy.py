"""PEP 562 lazy exports for the package ``__init__`` files: a public name is imported from its submodule
on first use, so importing a package (``pcb_aoi.edge``, say) imports nothing heavy such as torch.

Each ``__init__.py`` keeps a dict ``EXPORTS`` (public name -> submodule) and calls ``exports``; the deps
tool (``pcb_aoi.pipeline.deps``) reads the same dict to follow ``from pcb_aoi.edge import EdgeModel`` to
the file that defines it.
"""
from __future__ import annotations

import sys
from importlib import import_module
from typing import Any, Callable


def exports(package: str, names: dict[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """Module ``__getattr__`` and ``__dir__`` for ``package``, whose public ``names`` live in submodules."""

    def __getattr__(name: str) -> Any:
        if name not in names:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(import_module(f"{package}.{names[name]}"), name)
        setattr(sys.modules[package], name, value)  # later lookups skip __getattr__
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(names))

    return __getattr__, __dir__
