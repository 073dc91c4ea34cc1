"""pcb-aoi: PCB defect detection, from data to an edge model.

The pipeline's stages (``src/stages/<stage>.py``) run over the sub-packages ``data``, ``model``,
``evaluation``, ``deploy`` and ``pipeline``; ``edge`` is what the box beside the AOI machine runs,
without PyTorch; ``remote`` checks the DVC remote (docs/architecture.md). A small Python API, imported
lazily so that ``import pcb_aoi`` imports neither torch nor onnxruntime:

    import pcb_aoi
    params = pcb_aoi.load_params("params.yaml")           # the typed, validated params (pipeline.config)
    model = pcb_aoi.load_model("models/model.e2e.onnx")    # an edge.runtime.EdgeModel, torch-free
    for d in pcb_aoi.detect(model, "a_test.png", "a_temp.png"):  # arrays or image files
        print(d.cls, d.score, d.box)                       # class, score, x1 y1 x2 y2 image px
"""
from importlib import metadata as _metadata

from ._lazy import exports

try:
    __version__ = _metadata.version("pcb-aoi")
except _metadata.PackageNotFoundError:  # a source tree that is not installed (a DVC stage in an experiment's copy)
    __version__ = "0+unknown"

EXPORTS = {"load_params": "pipeline.config", "load_model": "edge.runtime", "detect": "edge.runtime"}
__all__ = ["__version__", *sorted(EXPORTS)]
__getattr__, __dir__ = exports(__name__, EXPORTS)
