"""pcb-aoi: PCB defect detection, from data to an edge model.

The pipeline's stages are ``src/stages/<stage>.py`` over the sub-packages ``data``, ``model``,
``evaluation``, ``deploy``, ``remote`` and ``pipeline``; ``edge`` is what the box beside the AOI machine
runs, without PyTorch (``docs/architecture.md``).
"""
from ._lazy import exports

try:
    from importlib.metadata import PackageNotFoundError, version

    __version__ = version("pcb-aoi")
except PackageNotFoundError:  # run from a source tree without installing (a DVC stage in an experiment copy)
    __version__ = "0+unknown"

EXPORTS = {"load_params": "pipeline.config"}
__all__ = ["__version__", *sorted(EXPORTS)]
__getattr__, __dir__ = exports(__name__, EXPORTS)
