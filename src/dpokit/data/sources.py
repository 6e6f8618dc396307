"""Rows from a dataset: a local file, a folder saved with ``datasets``, or a hub id.

Everything here returns plain Python rows (``list[dict]``); what the rows mean is the job of
:mod:`dpokit.data.formats`. Bad input raises :class:`DataError` with the file, the line or
row, and what to do, never a parser traceback.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from dpokit.config import DataSource

FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")


class DataError(ValueError):
    """A dataset problem a user can fix; the message names the file, the row and what to do."""


def describe(source: DataSource) -> str:
    """Return a short human name for ``source``, used as the origin in error messages."""
    if _is_local(source.path):
        return source.path
    subset = f", name={source.name}" if source.name else ""
    return f"{source.path} (hub dataset{subset}, split={source.split})"


def load_rows(source: DataSource) -> list[dict[str, Any]]:
    """Return every row of ``source`` as a dict, in file order.

    ``source.path`` is a ``.jsonl``/``.json``/``.parquet``/``.csv`` file, a folder written by
    ``datasets``' ``save_to_disk``, or else a Hugging Face hub dataset id loaded with
    ``load_dataset(path, name=source.name, split=source.split)``. Raises :class:`DataError`
    for a missing file, a malformed one, or a dataset with no rows.
    """
    path = Path(source.path)
    suffix = path.suffix.lower()
    if suffix in FILE_SUFFIXES:
        if not path.is_file():
            raise DataError(f"data file {source.path} does not exist (check the path in data.train / data.eval)")
        readers = {".jsonl": _read_jsonl, ".json": _read_json, ".parquet": _read_parquet, ".csv": _read_csv}
        rows = readers[suffix](path, source.split)
    elif path.is_dir():
        rows = _read_saved_dataset(path, source.split)
    else:
        rows = _read_hub(source)
    if not rows:
        raise DataError(f"{describe(source)} has no rows: give a dataset with at least one preference pair")
    return rows


def _is_local(path: str) -> bool:
    return Path(path).suffix.lower() in FILE_SUFFIXES or Path(path).exists()


# ----------------------------------------------------------------------------- local files


def _parse_jsonl(text: str, path: Path) -> list[dict[str, Any]]:
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(
                f"{path}, line {number}: not valid JSON ({e.msg} at column {e.colno}). "
                "Each line of a .jsonl file must be one JSON object; fix or remove that line."
            ) from None
        if not isinstance(row, dict):
            raise DataError(
                f"{path}, line {number}: expected a JSON object like "
                f'{{"prompt": ..., "chosen": ..., "rejected": ...}}, got {type(row).__name__}'
            )
        rows.append(row)
    return rows


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text (byte {e.start}): save it as UTF-8") from None


def _read_jsonl(path: Path, split: str) -> list[dict[str, Any]]:
    return _parse_jsonl(_read_text(path), path)


def _read_json(path: Path, split: str) -> list[dict[str, Any]]:
    """A list of objects, or ``{"<split>": [objects]}``; JSON Lines saved as ``.json`` also works."""
    text = _read_text(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # one object per line, as `datasets` writes .json files
            return _parse_jsonl(text, path)
        raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    if isinstance(data, dict):
        if isinstance(data.get(split), list):
            data = data[split]
        else:
            raise DataError(
                f"{path} holds an object with keys {sorted(data)[:10]}; expected a list of rows, "
                f"or an object with the list under the split name '{split}' (set data.train.split)"
            )
    if not isinstance(data, list):
        raise DataError(f"{path} must hold a list of row objects, got {type(data).__name__}")
    for number, row in enumerate(data, start=1):
        if not isinstance(row, dict):
            raise DataError(f"{path}, row {number}: expected a JSON object, got {type(row).__name__}")
    return data


def _read_parquet(path: Path, split: str) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises several types for a broken file
        raise DataError(f"{path}: could not read it as Parquet ({e})") from None


def _read_csv(path: Path, split: str) -> list[dict[str, Any]]:
    """CSV cells are strings: a CSV can only hold the string (standard) shape."""
    with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: drop an Excel BOM
        try:
            reader = csv.DictReader(f)
            rows = [dict(row) for row in reader]
        except (csv.Error, UnicodeDecodeError) as e:
            raise DataError(f"{path}: could not read it as CSV ({e})") from None
    for number, row in enumerate(rows, start=1):
        if None in row:  # more cells than header columns
            raise DataError(f"{path}, row {number}: has more cells than the header has columns")
    return rows


# ----------------------------------------------------------------------------- datasets


def _read_saved_dataset(path: Path, split: str) -> list[dict[str, Any]]:
    """A folder written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``."""
    if not ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()):
        raise DataError(
            f"{path} is a folder but not a dataset saved with datasets' save_to_disk; "
            "point data.train at a .jsonl/.json/.parquet/.csv file inside it"
        )
    import datasets

    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(f"{path} has splits {list(loaded)}, not '{split}': set data.train.split")
        loaded = loaded[split]
    return loaded.to_list()


def _read_hub(source: DataSource) -> list[dict[str, Any]]:
    import datasets

    try:
        dataset = datasets.load_dataset(source.path, name=source.name, split=source.split)
    except Exception as e:  # network, auth, unknown id, unknown split: all end up here
        raise DataError(
            f"could not load '{source.path}' from the Hugging Face Hub "
            f"(name={source.name}, split={source.split}): {type(e).__name__}: {e}. "
            f"No local file or folder named '{source.path}' exists either; give a "
            ".jsonl/.json/.parquet/.csv file, or check the dataset id, subset, split and your network."
        ) from None
    return dataset.to_list()
