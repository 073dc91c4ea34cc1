"""The model's life after the pipeline: the registry of versions and stages (git tags via GTO, files in
the DVC remote) and fetching a version onto the edge box (pcb-aoi-registry)."""
from .._lazy import exports

EXPORTS = {"RegistryError": "registry", "register": "registry", "promote": "registry", "fetch": "registry",
           "versions": "registry", "model_artifacts": "registry", "STAGES": "registry", "SIDECAR": "registry"}
__all__ = sorted(EXPORTS)
__getattr__, __dir__ = exports(__name__, EXPORTS)
