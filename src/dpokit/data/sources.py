"""Rows from a dataset: a local file, a folder saved with ``datasets``, or a hub id.

Everything here returns plain Python rows (``list[dict]``); what the rows mean is the job of
:mod:`dpokit.data.formats`. Bad input raises :class:`DataError` with the file, the line or
row, and what to do, never a parser traceback. Under ``data.on_error: skip`` a bad line of a
``.jsonl`` file is counted in a :class:`Problems` instead.

:func:`open_source` separates finding a dataset from reading its rows: the opened source has an
``identity`` (path, size and modification time of a file; fingerprint of a hub or saved
dataset) that keys the tokenization cache, so a cached dataset is never parsed again.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

from dpokit.config import DataSource

TEXT_SUFFIXES = (".jsonl", ".ndjson", ".json", ".csv")
"""Local text file types, by suffix (``.ndjson`` is JSON Lines); each may be gzipped (``.jsonl.gz``)."""
FILE_SUFFIXES = (*TEXT_SUFFIXES, ".parquet")

MAX_SHOWN = 5
"""How many problem messages :class:`Problems` keeps to show."""

SKIP_HINT = "Fix or remove that row, or set data.on_error=skip to drop bad rows (they are counted by reason)"


class DataError(ValueError):
    """A dataset problem a user can fix; the message names the file, the row and what to do."""


class RowError(DataError):
    """A problem with one row (or pair); ``reason`` is the short name it is counted under."""

    def __init__(self, message: str, reason: str = "invalid"):
        super().__init__(message)
        self.reason = reason

    def __reduce__(self):  # keep the reason across process pools
        return (RowError, (str(self), self.reason))


@dataclass
class Problems:
    """Rows dropped under ``data.on_error: skip``: how many per reason, and the first messages."""

    counts: dict[str, int] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)
    """The first :data:`MAX_SHOWN` messages, each naming the file, row and field."""

    def add(self, reason: str, message: str) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        if len(self.examples) < MAX_SHOWN:
            self.examples.append(message)

    def extend(self, other: Problems) -> None:
        for reason, n in other.counts.items():
            self.counts[reason] = self.counts.get(reason, 0) + n
        self.examples.extend(other.examples[: MAX_SHOWN - len(self.examples)])

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def __bool__(self) -> bool:
        return bool(self.counts)


@dataclass
class Rows:
    """Rows of one dataset; ``lines[i]`` is row ``i``'s line number in a ``.jsonl`` file."""

    rows: list[dict[str, Any]]
    lines: list[int] | None = None
    problems: Problems = field(default_factory=Problems)
    """Lines that could not be read (only under ``on_error="skip"``)."""

    def where(self, index: int) -> str:
        """``"line 7"`` for a .jsonl file, else ``"row 7"`` (1-based) for row ``index``."""
        return f"line {self.lines[index]}" if self.lines is not None else f"row {index + 1}"


@dataclass
class OpenedSource:
    """A dataset found but not read yet: ``identity`` says exactly which data it is."""

    source: DataSource
    origin: str
    identity: dict[str, Any]
    _read: Callable[[str], Rows]

    def read(self, on_error: str = "raise") -> Rows:
        """All rows, in order; raises :class:`DataError` when there are none."""
        rows = self._read(on_error)
        if not rows.rows:
            skipped = f" ({rows.problems.total} unreadable lines skipped)" if rows.problems else ""
            raise DataError(f"{self.origin} has no rows{skipped}: give a dataset with at least one preference pair")
        return rows


HUB_SETTINGS = ("split", "name", "revision")
"""The settings of a :class:`DataSource` that choose part of a dataset, not every source has."""

SETTINGS_HELP = ("split, name and revision choose part of a hub dataset; split also picks a split of a "
                 "saved DatasetDict folder or of a .json file keyed by split")

_DEFAULTS = {f.name: f.default for f in fields(DataSource)}


def given_settings(source: DataSource, names: tuple[str, ...] = HUB_SETTINGS) -> list[str]:
    """The settings among ``names`` that ``source`` sets away from their default, as ``key=value``."""
    return [f"{name}={getattr(source, name)}" for name in names if getattr(source, name) != _DEFAULTS[name]]


def ignored_settings(source: DataSource) -> tuple[str, ...]:
    """The settings of :data:`HUB_SETTINGS` that a source of this kind, told by its path alone,
    never uses: all three for a data file but ``.json`` (which may be keyed by split), name and
    revision for a ``.json`` file or a local folder, none for a hub id."""
    suffix = file_type(Path(source.path))
    if suffix == ".json" or (not suffix and Path(source.path).is_dir()):
        return ("name", "revision")
    return HUB_SETTINGS if suffix else ()


def refuse_settings(source: DataSource, names: tuple[str, ...], what: str) -> None:
    """Raise :class:`DataError` when ``source`` sets one of ``names``, which ``what`` (the kind
    of source, e.g. "a .jsonl file") has no use for: a silently ignored setting reads other data."""
    given = given_settings(source, names)
    if given:
        keys = " and ".join(setting.split("=")[0] for setting in given)
        raise DataError(
            f"{source.path} is {what}, so {', '.join(given)} has no effect: remove {keys} from this data source ({SETTINGS_HELP})"
        )


def check_data_argument(path: str, split: str, flag: str = "--data", split_flag: str = "--split") -> None:
    """Refuse a dataset given on the command line as ``flag path`` (with ``split_flag split``)
    that cannot be what was meant, naming the flags: a data file that does not exist, or a split
    on a file type that has none. What only reading can tell is left to :func:`open_source`."""
    suffix = file_type(Path(path))
    if suffix and not Path(path).is_file():
        raise DataError(f"data file {path} does not exist (check the path given to {flag})")
    source = DataSource(path=path, split=split)
    if "split" in ignored_settings(source) and given_settings(source, ("split",)):
        raise DataError(
            f"{split_flag} {split} has no effect on {flag} {path}, a {suffix} file, which has no splits: "
            f"drop {split_flag} ({SETTINGS_HELP})"
        )


def describe(source: DataSource | list[DataSource]) -> str:
    """Return a short human name for ``source`` (or a list of them), used as the origin in messages."""
    if isinstance(source, list):
        return " + ".join(describe(s) for s in source)
    if _is_local(source.path):
        return f"{source.path} (split={source.split})" if source.split != _DEFAULTS["split"] else source.path
    subset = f", name={source.name}" if source.name else ""
    revision = f", revision={source.revision}" if source.revision else ""
    return f"{source.path} (hub dataset{subset}, split={source.split}{revision})"


def open_source(source: DataSource) -> OpenedSource:
    """Find ``source`` and say what it is, without reading its rows (a hub dataset is loaded).

    ``source.path`` is a ``.jsonl``/``.json``/``.parquet``/``.csv`` file, a folder written by
    ``datasets``' ``save_to_disk``, or else a Hugging Face hub dataset id loaded with
    ``load_dataset(path, name=source.name, split=source.split, revision=source.revision)``.
    Raises :class:`DataError` for a missing file, an unloadable dataset, or a split, name or
    revision the source has no use for (see :func:`ignored_settings`).
    """
    path = Path(source.path)
    suffix = file_type(path)
    origin = describe(source)
    if suffix:
        if not path.is_file():
            raise DataError(f"data file {source.path} does not exist (check the path in data.train / data.eval)")
        refuse_settings(source, ignored_settings(source), f"a {suffix} file")
        stat = path.stat()
        identity = {"kind": "file", "path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "split": source.split}
        if suffix == ".json" and given_settings(source, ("split",)):
            # read now, so a file that turns out to have no splits is refused even when cached;
            # under a split there is no line to skip (JSON Lines has no splits), so on_error is moot
            rows = _read_json(path, source.split)
            return OpenedSource(source, origin, identity, lambda on_error: rows)
        readers = {".jsonl": _read_jsonl, ".ndjson": _read_jsonl, ".json": _read_json, ".parquet": _read_parquet, ".csv": _read_csv}
        return OpenedSource(source, origin, identity, lambda on_error: readers[suffix](path, source.split, on_error))
    if path.is_file():
        raise DataError(
            f"{source.path} is a file dpokit cannot read: data files are {', '.join(FILE_SUFFIXES)} "
            "(the text ones may be gzipped, e.g. .jsonl.gz); convert it to one of them"
        )
    if path.is_dir():
        refuse_settings(source, ignored_settings(source), "a local folder")
        dataset = _load_saved_dataset(path, source.split)
        identity = {"kind": "saved", "path": str(path.resolve()), "split": source.split, "fingerprint": dataset._fingerprint}
    else:
        dataset = _load_hub(source)
        identity = {"kind": "hub", "path": source.path, "name": source.name, "split": source.split,
                    "revision": source.revision, "fingerprint": dataset._fingerprint}
    return OpenedSource(source, origin, identity, lambda on_error: Rows(dataset.to_list()))


def load_rows(source: DataSource) -> list[dict[str, Any]]:
    """Return every row of ``source`` as a dict, in file order (see :func:`open_source`).

    Raises :class:`DataError` for a missing file, a malformed one, or a dataset with no rows.
    """
    return open_source(source).read().rows


def _is_local(path: str) -> bool:
    return bool(file_type(Path(path))) or Path(path).exists()


def file_type(path: Path) -> str:
    """The data file type ``path`` names, one of :data:`FILE_SUFFIXES` (a ``.gz`` ending looked
    through for the text types), or ``""``."""
    suffixes = [s.lower() for s in path.suffixes[-2:]]
    if suffixes[-1:] == [".gz"]:
        return suffixes[0] if len(suffixes) == 2 and suffixes[0] in TEXT_SUFFIXES else ""
    return suffixes[-1] if suffixes and suffixes[-1] in FILE_SUFFIXES else ""


def _open_text(path: Path, newline: str | None = None):
    """``path`` as UTF-8 text, gunzipped when it ends in ``.gz``; a leading byte-order mark is dropped."""
    if path.suffix.lower() == ".gz":
        return io.TextIOWrapper(gzip.open(path), encoding="utf-8-sig", newline=newline)
    return open(path, encoding="utf-8-sig", newline=newline)


# ----------------------------------------------------------------------------- local files


def _parse_jsonl(text: str, path: Path, on_error: str = "raise") -> Rows:
    out = Rows([], lines=[])
    # "\n" only: str.splitlines also splits at U+2028, U+2029, U+0085 and others, which JSON
    # writers (json.dumps(..., ensure_ascii=False) among them) leave raw inside strings
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            message = (f"{path}, line {number}: not valid JSON ({e.msg} at column {e.colno}). "
                       "Each line of a .jsonl file must be one JSON object")
            if on_error != "skip":
                raise RowError(f"{message}; fix or remove that line, or set data.on_error=skip to drop bad lines "
                               "(they are counted)", "malformed_json") from None
            out.problems.add("malformed_json", message)
            continue
        if not isinstance(row, dict):
            message = (f"{path}, line {number}: expected a JSON object like "
                       f'{{"prompt": ..., "chosen": ..., "rejected": ...}}, got {type(row).__name__}')
            if on_error != "skip":
                raise RowError(message, "not_an_object")
            out.problems.add("not_an_object", message)
            continue
        out.rows.append(row)
        out.lines.append(number)
    return out


def _read_text(path: Path) -> str:
    try:
        with _open_text(path) as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text (byte {e.start}): save it as UTF-8") from None
    except (OSError, EOFError) as e:  # gzip: not a gzip file, or cut short
        raise DataError(f"{path}: could not read it ({e})") from None


def _read_jsonl(path: Path, split: str, on_error: str = "raise") -> Rows:
    return _parse_jsonl(_read_text(path), path, on_error)


def _read_json(path: Path, split: str, on_error: str = "raise") -> Rows:
    """A list of objects, or ``{"<split>": [objects]}``; JSON Lines saved as ``.json`` also works."""
    text = _read_text(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data" or _some_line_is_an_object(text):  # JSON Lines, as `datasets` writes .json files
            _no_split(path, split, "JSON Lines")
            return _parse_jsonl(text, path, on_error)  # a broken line is reported (or skipped) as in .jsonl
        raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    if isinstance(data, dict):
        if isinstance(data.get(split), list):
            data = data[split]
        elif _one_row_per_line(text, data):  # JSON Lines of one row, as datasets' to_json writes it
            _no_split(path, split, "JSON Lines")
            return _parse_jsonl(text, path, on_error)
        else:
            raise DataError(
                f"{path} holds an object with keys {sorted(data)[:10]}; expected a list of rows, "
                f"or an object with the list under the split name '{split}' (set data.train.split)"
            )
    elif isinstance(data, list):
        _no_split(path, split, "a list of rows")
    if not isinstance(data, list):
        raise DataError(f"{path} must hold a list of row objects, got {type(data).__name__}")
    return Rows(data)  # a row that is not an object is reported (or skipped) by its number when normalized


def _some_line_is_an_object(text: str, most: int = 50) -> bool:
    """Whether ``text`` that is not one JSON value reads as JSON Lines: more than one line, and one
    of its first ``most`` lines a JSON object on its own (so its first line may be the broken one)."""
    lines = [line for line in text.split("\n") if line.strip()]
    if len(lines) < 2:
        return False
    for line in lines[:most]:
        try:
            if isinstance(json.loads(line), dict):
                return True
        except json.JSONDecodeError:
            continue
    return False


def _no_split(path: Path, split: str, what: str) -> None:
    """Refuse a non-default ``split`` for a ``.json`` file that is not keyed by split."""
    if split != _DEFAULTS["split"]:
        raise DataError(
            f"{path} holds {what}, not lists keyed by split name, so split={split} has no effect: "
            f"remove split from this data source ({SETTINGS_HELP})"
        )


def _one_row_per_line(text: str, data: dict) -> bool:
    """Whether a ``.json`` file holding the one object ``data`` is a row rather than splits: it is
    written on one line, and not every value is a list (splits are) unless it has chosen/rejected."""
    one_line = len([line for line in text.split("\n") if line.strip()]) == 1
    return one_line and (not all(isinstance(v, list) for v in data.values()) or "chosen" in data or "rejected" in data)


def _read_parquet(path: Path, split: str, on_error: str = "raise") -> Rows:
    import pyarrow.parquet as pq

    try:
        return Rows(pq.read_table(path).to_pylist())
    except Exception as e:  # pyarrow raises several types for a broken file
        raise DataError(f"{path}: could not read it as Parquet ({e})") from None


def _read_csv(path: Path, split: str, on_error: str = "raise") -> Rows:
    """CSV cells are strings: a CSV can only hold the string (standard) shape."""
    with _open_text(path, newline="") as f:  # drops an Excel BOM
        try:
            reader = csv.DictReader(f)
            rows = [dict(row) for row in reader]
            header = reader.fieldnames or []
        except (csv.Error, UnicodeDecodeError, OSError, EOFError) as e:
            raise DataError(f"{path}: could not read it as CSV ({e})") from None
    for number, row in enumerate(rows, start=1):
        extra = row.get(None)  # csv.DictReader puts the cells past the header's columns under None
        if extra is not None:
            raise DataError(
                f"{path}, row {number}: has more cells than the header ({len(header) + len(extra)} cells, "
                f"{len(header)} columns: {', '.join(header)}); quote every cell that holds a comma "
                '("like, this"), or name every column in the header line'
            )
    for number, row in enumerate(rows[:100], start=1):
        column = next((name for name, cell in row.items() if _SERIALIZED_MESSAGES.match(cell or "")), None)
        if column is not None:  # pandas' to_csv of message lists: their text would be trained as a reply
            raise DataError(
                f"{path}, row {number}: column '{column}' holds a list of messages written out as text "
                f"({row[column][:40]}...); a CSV holds only text, so save this data as .jsonl or .parquet "
                "(pandas: df.to_json(path, orient='records', lines=True))"
            )
    return Rows(rows)


_SERIALIZED_MESSAGES = re.compile(r"""\s*\[\s*\{\s*['"](role|from)['"]\s*:""")


# ----------------------------------------------------------------------------- datasets


def _load_saved_dataset(path: Path, split: str):
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
    elif split != _DEFAULTS["split"]:
        raise DataError(
            f"{path} is a dataset saved without splits (a Dataset, not a DatasetDict), so split={split} has no effect: "
            f"remove split from this data source ({SETTINGS_HELP})"
        )
    return loaded


def _load_hub(source: DataSource):
    import datasets

    from dpokit.hub import OFFLINE_HINT, unreachable

    if why := unreachable(source.path, "dataset"):
        raise DataError(f"could not load '{source.path}' from the Hugging Face Hub: {why}. No local file or folder "
                        f"named '{source.path}' exists either; give a .jsonl/.json/.parquet/.csv file, or {OFFLINE_HINT}")
    try:
        return datasets.load_dataset(source.path, name=source.name, split=source.split, revision=source.revision)
    except Exception as e:  # network, auth, unknown id, unknown split: all end up here
        raise DataError(
            f"could not load '{source.path}' from the Hugging Face Hub "
            f"(name={source.name}, split={source.split}, revision={source.revision}): {type(e).__name__}: {e}. "
            f"No local file or folder named '{source.path}' exists either; give a "
            ".jsonl/.json/.parquet/.csv file, or check the dataset id, subset, split and your network."
        ) from None
