"""The project's DVC remote on Azure Blob: a check that names the setting to fix, and dvc push / pull
with bounded waits (pcb-aoi-remote, also ``python -m pcb_aoi.remote``)."""
from .._lazy import exports

EXPORTS = {"RemoteError": "dvc_remote", "check": "dvc_remote", "guarded": "dvc_remote"}
__all__ = sorted(EXPORTS)
__getattr__, __dir__ = exports(__name__, EXPORTS)
