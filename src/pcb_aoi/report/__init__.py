"""Pages people look at: one self-contained HTML file per folder run of the edge app or evaluate run,
``pcb-aoi-report`` (torch-free: stdlib and PIL)."""
from .._lazy import exports

EXPORTS = {
    "main": "cli", "ReportError": "page", "write_page": "page", "read_journal": "edge", "borderline": "edge",
    "Run": "edge",
}
__all__ = sorted(EXPORTS)
__getattr__, __dir__ = exports(__name__, EXPORTS)
