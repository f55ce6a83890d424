"""Read raw records (dicts) from where a config says: local JSON/JSONL/Parquet/CSV/.txt files or
folders, the optional Hugging Face `datasets` library, or the built-in synthetic task.

Plain `.txt` files are text records: one document per file (`txt_documents: file`), or one per
block of lines separated by a blank line (`txt_documents: blank_line`). A folder source holds
`<split>.<ext>`, or the split's shards as a Hub dataset repository lays them out
(`data/<split>-00000-of-00002.parquet`, `<split>/...`); failing that, a folder of `.txt` files is
read whole (sorted by name). A folder whose README.md declares `configs` (a Hub dataset card,
kubetune.trainer.data.hub_card) is read as the card says: its default config, or the config
CONFIG for the source FOLDER/CONFIG, each split from its `data_files`.

Every record keeps a note of where it came from ("train.jsonl record 12 (line 12)") so a
malformed one is reported by file and record number. Torch-free.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from kubetune.errors import KubetuneError
from kubetune.safe_yaml import read_user_text

FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".txt")
BUILTIN_SOURCES = ("builtin://tiny_instruct", "builtin://tiny_preference")


class DatasetError(KubetuneError):
    """A dataset the user can fix: the message names the file, the record and the field."""


@dataclass(frozen=True)
class SourceRecord:
    data: dict[str, Any]
    where: str  # "data/train.jsonl record 12 (line 12)": for error messages
    aliases: dict[str, str] = field(default_factory=dict)  # format field -> the user's column (dataset.columns)

    def column(self, name: str) -> str:
        """The user's name for the field `name` (for error messages)."""
        return self.aliases.get(name, name)


def load_records(source: str, split: str = "train", text_key: str = "text", txt_documents: str = "file") -> list[SourceRecord]:
    """All records of `split` in `source` (see DatasetSection.source for the forms it takes).
    `.txt` files become {text_key: document} records, split into documents as `txt_documents` says."""
    if source.startswith("builtin://"):
        return _builtin_records(source)
    if source.startswith("hf://"):
        return _hf_records(source[len("hf://"):], split)
    path = Path(source).expanduser()
    csv_sep = ","
    card = _card_split_files(source, path, split)
    if card is not None:
        files, csv_sep = card
    elif path.is_dir():
        if not has_split(source, split) and any(path.glob("*.txt")):
            files = sorted(path.glob("*.txt"))
            return [r for file in files for r in _read_txt(file, text_key, txt_documents)]
        files = _split_files(path, split)
    elif not path.is_file():
        raise DatasetError(f"dataset.source {source}: no such file or folder")
    else:
        files = [path]
    return [r for file in files for r in _read_records(file, text_key, txt_documents, csv_sep)]


def _read_records(file: Path, text_key: str, txt_documents: str, csv_sep: str) -> list[SourceRecord]:
    suffix = file.suffix.lower()
    if suffix == ".txt":
        return _read_txt(file, text_key, txt_documents)
    return _read_csv(file, csv_sep) if suffix == ".csv" else read_file(file)


def has_split(source: str, split: str) -> bool:
    """Whether a folder source holds files for `split` (hf:// sources are asked at load time)."""
    path = Path(source).expanduser()
    card = _card_config(path)
    if card is not None:
        base, config = card
        return split in config.data_files if config.data_files is not None else has_split(str(base), split)
    return path.is_dir() and bool(_hub_split_files(path, split) or any((path / f"{split}{suffix}").is_file() for suffix in FILE_SUFFIXES))


def _hub_split_files(folder: Path, split: str) -> list[Path]:
    """A split's files laid out as in a Hugging Face Hub dataset repository (what the initializer
    downloads for an hf:// dataset), by the Hub's data-files convention: a `<split>/` folder, or
    files named `<split>-...`, `<split>_...`, `<split>.N...` in the folder or its `data/` folder
    (`data/train-00000-of-00002.parquet`). Shards in name order."""
    named = re.compile(rf"^{re.escape(split)}([-_.][^/]*)?$")
    found: list[Path] = []
    for where in (folder, folder / "data"):
        if (where / split).is_dir():
            found += sorted(p for p in (where / split).rglob("*") if p.is_file() and p.suffix.lower() in FILE_SUFFIXES)
        if where.is_dir():
            found += sorted(p for p in where.iterdir() if p.is_file() and p.suffix.lower() in FILE_SUFFIXES and named.match(p.stem))
    return found


def _card_config(path: Path) -> Optional[tuple[Path, Any]]:
    """(the folder its patterns start from, the config) when a dataset card decides what `path`
    holds: FOLDER with a card declaring configs (its default config), or FOLDER/CONFIG with
    CONFIG declared in FOLDER's card (a folder FOLDER/CONFIG that the card does not declare is
    read as a folder). None: no card applies."""
    from kubetune.trainer.data import hub_card  # it imports this module (DatasetError)

    if path.is_dir():
        configs = hub_card.read_card(path)
        if configs:
            config = hub_card.default_config(configs, str(path / hub_card.CARD))
            if config is None:
                raise DatasetError(
                    f"dataset.source {path}: its dataset card ({hub_card.CARD}) declares the configs {hub_card.names(configs)} "
                    f"and none is the default; name one after the folder: {path}/CONFIG (hf://ORG/NAME/CONFIG)"
                )
            return _config_base(path, config), config
    parent = path.parent
    if path.name and parent != path and parent.is_dir():
        configs = hub_card.read_card(parent)
        if path.name in configs:
            return _config_base(parent, configs[path.name]), configs[path.name]
        if configs and not path.exists():
            raise DatasetError(
                f"dataset.source {path}: the dataset card {parent / hub_card.CARD} declares no config {path.name!r} "
                f"(its configs: {hub_card.names(configs)}) and there is no such folder; name one of its configs"
            )
    return None


def _config_base(root: Path, config: Any) -> Path:
    return root / config.data_dir if config.data_dir else root


def _card_split_files(source: str, path: Path, split: str) -> Optional[tuple[list[Path], str]]:
    """The files of `split` when a dataset card decides (None: it does not), pattern by pattern in
    the card's order, and the CSV separator its config sets. Every pattern must match a file, as for the Hub; files of other types (.md,
    .py, ...) are left out, and a split of nothing else is an error naming them."""
    from kubetune.trainer.data import hub_card

    card = _card_config(path)
    if card is None:
        return None
    base, config = card
    if config.data_files is None:  # data_dir alone: its usual layout
        return _split_files(base, split), config.csv_sep
    where = f"dataset.source {source}: config {config.name!r} of its dataset card"
    if split not in config.data_files:
        raise DatasetError(
            f"{where}: no split {split!r}; its splits: {', '.join(config.data_files)}; set dataset.split "
            "(or dataset.eval_split) to one of them"
        )
    files: list[Path] = []
    for pattern in config.data_files[split]:
        matched = hub_card.match_files(base, pattern)
        if not matched:
            raise DatasetError(f"{where}: split {split!r}: {pattern!r} matches no file in {base}")
        files += matched
    readable = [file for file in files if file.suffix.lower() in FILE_SUFFIXES]
    if not readable:
        names = ", ".join(str(file.relative_to(base)) for file in files[:5])
        raise DatasetError(
            f"{where}: split {split!r} is {names}{', ...' if len(files) > 5 else ''}: no file kubetune reads; "
            f"convert the data to {', '.join(FILE_SUFFIXES)}"
        )
    return readable, config.csv_sep


def read_file(path: Path) -> list[SourceRecord]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _read_jsonl(path)
    if suffix == ".json":
        return _read_json(path)
    if suffix == ".parquet":
        return _read_parquet(path)
    if suffix == ".csv":
        return _read_csv(path)
    if suffix == ".txt":
        return _read_txt(path, "text", "file")
    raise DatasetError(f"{path}: unsupported file type '{suffix}'; use .jsonl, .json, .parquet, .csv or .txt")


def _split_files(folder: Path, split: str) -> list[Path]:
    for suffix in FILE_SUFFIXES:
        candidate = folder / f"{split}{suffix}"
        if candidate.is_file():
            return [candidate]
    hub = _hub_split_files(folder, split)
    if hub:
        return hub
    found = sorted(p.name for p in folder.iterdir() if p.suffix in FILE_SUFFIXES)
    raise DatasetError(
        f"dataset.source {folder}: no file for split '{split}' (looked for {split}.jsonl, {split}.json, "
        f"{split}.parquet, {split}.csv, and {split}-*/{split}/ files there or in data/); found: {', '.join(found) or 'nothing'}; "
        "set dataset.split to one of them"
    )


def _read_jsonl(path: Path) -> list[SourceRecord]:
    records = []
    with path.open("rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            where = f"{path} record {len(records) + 1} (line {line_number})"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DatasetError(f"{where}: not UTF-8 text ({exc.reason} at byte {exc.start} of the line)") from None
            if not line.strip():
                continue
            try:
                data = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DatasetError(f"{where}: not valid JSON: {exc.msg} at column {exc.colno}") from None
            records.append(SourceRecord(_require_object(data, where), where))
    return records


def read_utf8(path: Path) -> str:
    return read_user_text(path, DatasetError)


def _read_json(path: Path) -> list[SourceRecord]:
    try:
        data = json.loads(read_utf8(path))
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{path}: not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    if not isinstance(data, list):
        raise DatasetError(f"{path}: a .json dataset must be a list of records, got {type(data).__name__}")
    return [
        SourceRecord(_require_object(item, f"{path} record {i}"), f"{path} record {i}")
        for i, item in enumerate(data, start=1)
    ]


def _read_parquet(path: Path) -> list[SourceRecord]:
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as exc:  # pyarrow raises several types for unreadable files
        raise DatasetError(f"{path}: cannot read as Parquet: {exc}") from None
    return [SourceRecord(row, f"{path} record {i}") for i, row in enumerate(rows, start=1)]


def _read_csv(path: Path, sep: str = ",") -> list[SourceRecord]:
    """A CSV file with a header row, columns typed as the `datasets` library (pandas) types them:
    empty cells and NA/null are None, numbers are numbers."""
    import pyarrow.csv as pcsv

    try:
        rows = pcsv.read_csv(path, parse_options=pcsv.ParseOptions(delimiter=sep),
                             convert_options=pcsv.ConvertOptions(strings_can_be_null=True)).to_pylist()
    except Exception as exc:  # pyarrow raises ArrowInvalid and others for malformed files
        raise DatasetError(f"{path}: cannot read as CSV (a header row, then one record per row): {exc}") from None
    return [SourceRecord(row, f"{path} row {i}") for i, row in enumerate(rows, start=1)]


def _read_txt(path: Path, text_key: str, documents: str) -> list[SourceRecord]:
    """A plain text file as text records: the whole file, or each blank-line-separated block."""
    text = read_utf8(path)
    if documents == "file":
        return [SourceRecord({text_key: text}, f"{path}")] if text.strip() else []
    blocks, current, first_line = [], [], 1
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            if not current:
                first_line = number
            current.append(line)
        elif current:
            blocks.append((first_line, "\n".join(current)))
            current = []
    if current:
        blocks.append((first_line, "\n".join(current)))
    return [
        SourceRecord({text_key: block}, f"{path} document {i} (line {line})")
        for i, (line, block) in enumerate(blocks, start=1)
    ]


def _require_object(data: Any, where: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise DatasetError(f"{where}: a record must be a JSON object, got {type(data).__name__}")
    return data


def _builtin_records(source: str) -> list[SourceRecord]:
    if source not in BUILTIN_SOURCES:
        raise DatasetError(f"dataset.source {source}: unknown built-in dataset; known: {', '.join(BUILTIN_SOURCES)}")
    from kubetune.trainer.data.preference import preference_records
    from kubetune.trainer.data.synthetic import alpaca_records

    records = alpaca_records() if source == "builtin://tiny_instruct" else preference_records()
    return [SourceRecord(r, f"{source} record {i}") for i, r in enumerate(records, start=1)]


def _hf_records(name: str, split: str) -> list[SourceRecord]:
    """hf://org/name or hf://org/name/config (or hf://datasets/org/name[/config]), through the
    optional `datasets` library."""
    try:
        import datasets
    except ImportError:
        raise DatasetError(
            f"dataset.source hf://{name}: needs the optional `datasets` library (pip install datasets), "
            "or download the data and point dataset.source at the local files"
        ) from None
    parts = name.split("/")
    if parts[0] == "datasets" and len(parts) >= 3:  # huggingface_hub's form: hf://datasets/ORG/NAME[/CONFIG]
        parts = parts[1:]
    repo = "/".join(parts[:2])
    config = parts[2] if len(parts) > 2 else None
    try:
        table = datasets.load_dataset(repo, config, split=split)
    except Exception as exc:  # the library raises many types (missing split, no network, ...)
        raise DatasetError(f"dataset.source hf://{name} split '{split}': {exc}") from None
    return [SourceRecord(dict(row), f"hf://{name} [{split}] record {i}") for i, row in enumerate(table, start=1)]
