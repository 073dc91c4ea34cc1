"""The data stages and the canonical dataset on disk: sources and readers of real datasets (several at once:
``combine``), the synthetic generator, ingest, etl, split, augment, the parquet manifests with atomic writes
(``dataset``), and ``pcb-aoi-data-diff`` (``diff``)."""
from .._lazy import exports

EXPORTS = {
    "Dataset": "dataset", "atomic_dir": "dataset", "atomic_file": "dataset", "write_json": "dataset",
    "split_ids": "dataset", "test_ids": "dataset", "DataError": "readers", "READERS": "readers",
    "board_samples": "synth",
}
__all__ = sorted(EXPORTS)
__getattr__, __dir__ = exports(__name__, EXPORTS)
