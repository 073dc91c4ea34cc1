"""The PyTorch detector: the network, its targets and losses, self-describing checkpoints, torch decoding
and prediction, and training (crops, loop, resume)."""
from .._lazy import exports

EXPORTS = {
    "Detector": "network", "DetectorConfig": "network", "IncompatibleCheckpoint": "checkpoint",
    "Runner": "inference", "decode": "inference", "predict": "inference", "torch_runner": "inference",
    "load_pair": "inference", "build_targets": "loss", "focal_loss": "loss", "box_loss": "loss",
    "TrainingDiverged": "training",
}
__all__ = sorted(EXPORTS)
__getattr__, __dir__ = exports(__name__, EXPORTS)
