"""How good a model is: COCO and operating-point metrics, the evaluate stage, overlay pictures of hits and
misses, and the pcb-aoi-review report of a model change."""
from .._lazy import exports

EXPORTS = {
    "coco_metrics": "metrics", "operating_point": "metrics", "score": "evaluate", "ReviewError": "review",
}
__all__ = sorted(EXPORTS)
__getattr__, __dir__ = exports(__name__, EXPORTS)
