"""The pipeline's shell: the typed params.yaml config, the stage entry-point runner, and the checks that
keep dvc.yaml complete (deps computed from imports; deps tracked by git for queued experiments)."""
from .._lazy import exports

EXPORTS = {
    "Params": "config", "ConfigError": "config", "load_params": "config", "CLASSES": "config",
    "run_stage": "cli", "stage_deps": "deps",
}
__all__ = sorted(EXPORTS)
__getattr__, __dir__ = exports(__name__, EXPORTS)
