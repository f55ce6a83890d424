"""Datasets: records from files (JSON/JSONL/Parquet), hf:// or the synthetic task -> tokenized,
masked, truncated and optionally packed samples -> batches."""
from kubetune.trainer.data.formats import IGNORE_INDEX, format_alpaca_prompt, tokenize_records
from kubetune.trainer.data.packing import pack_samples
from kubetune.trainer.data.sources import DatasetError, SourceRecord, load_records

__all__ = [
    "IGNORE_INDEX", "DatasetError", "SourceRecord", "format_alpaca_prompt", "load_records", "pack_samples",
    "tokenize_records",
]
