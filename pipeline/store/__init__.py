"""The run store: the only code that imports h5py or knows maps.h5's dataset names (layout.py).

Write: `MapsFile` (the runner and its writer thread): rows by `RowBatch`, skipped records,
run-level groups complete-or-absent, attempts. Read: `open_run(dir)` -> `RunReader` (merge,
report, plots, reproduce, summaries): ids, rows, maps by technique / layer / output, skipped
records, attempts, config, PNG paths, summaries.
"""
from pipeline.store.checks import check_resumable, key_differences, open_error, processes_holding
from pipeline.store.file import DTYPES, MapsFile, RowBatch
from pipeline.store.h5util import datasets, decode_strings
from pipeline.store.reader import MAPS, Column, RunReader, open_run, run_file

__all__ = ["Column", "DTYPES", "MAPS", "MapsFile", "RowBatch", "RunReader", "check_resumable", "datasets",
           "decode_strings", "key_differences", "open_error", "open_run", "processes_holding", "run_file"]
