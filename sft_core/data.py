"""Ingestion: turn a dataset source into rows, or fail with a one-line error naming the spot.

Sources: ``modelscope://owner/name``, ``hf://owner/name``, local ``.jsonl`` / ``.json``
(array or JSON Lines) / ``.parquet`` / ``.csv`` (plain path or ``file://``), and
``sample`` / ``bundled://sample`` for the sample shipped in the package.

Every row comes back with the three required keys (``question``, ``think``, ``answer``),
renamed from case/whitespace variants such as ``Question`` or `` answer ``; other
columns (``instruction``, ``metrics``...) are kept as they are and never required.
Whether the *values* are good is the validation stage's business (``sft_core.validation``).
"""

from __future__ import annotations

import csv
import difflib
import hashlib
import io
import json
import os
import stat
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from sft_core.errors import DataFormatError, DataSourceError
from sft_core.files import read_bytes
from sft_core.sources import Source, parse_data_source

BUNDLED_SAMPLE: Path = Path(__file__).parent / "sample_data" / "medical_sample.jsonl"
REQUIRED_COLUMNS: tuple[str, ...] = ("question", "think", "answer")
LOCAL_SUFFIXES = (".jsonl", ".ndjson", ".json", ".parquet", ".csv")

_BINARY_MAGIC = {
    b"\x89PNG\r\n\x1a\n": "a PNG image",
    b"\xff\xd8\xff": "a JPEG image",
    b"GIF8": "a GIF image",
    b"%PDF": "a PDF document",
    b"PK\x03\x04": "a ZIP archive",
    b"\x1f\x8b": "a gzip archive",
    b"PAR1": "a Parquet file",
    b"\x7fELF": "an executable",
}


@dataclass
class LoadedData:
    """Rows read from one source, with where they came from for error messages."""

    rows: list[dict[str, Any]]
    source: str
    location: str
    extra_columns: list[str] = field(default_factory=list)
    row_numbers: list[int] = field(default_factory=list)


# -- public entry points ------------------------------------------------------------


def load_rows(
    source: str,
    *,
    subset: str | None = None,
    split: str = "train",
    revision: str | None = None,
    cache_dir: str | None = None,
) -> LoadedData:
    """Read rows from ``source`` and normalise the required column names.

    Raises DataSourceError when the source cannot be reached or found, DataFormatError
    when what was fetched cannot be parsed into rows with the required columns.
    """
    src = parse_data_source(source, revision=revision)
    if src.kind == "bundled":
        location = str(BUNDLED_SAMPLE)
        rows, numbers = _read_local(BUNDLED_SAMPLE)
    elif src.kind == "modelscope":
        rows, location = _load_modelscope(src, subset, split, cache_dir)
        numbers = list(range(1, len(rows) + 1))
    elif src.kind == "hf":
        rows, location = _load_hf(src, subset, split, cache_dir)
        numbers = list(range(1, len(rows) + 1))
    else:
        path = src.path
        if not path.exists():
            raise DataSourceError(_missing_file_message(source, path), transient=False)
        require_regular_file(path)
        location = str(path)
        rows, numbers = _read_local(path)
    if not rows:
        raise DataFormatError(f"{location}: the dataset has no rows")
    renamed, extra = normalise_columns(rows, location, numbers)
    return LoadedData(rows=renamed, source=source, location=location, extra_columns=extra, row_numbers=numbers)


def dataset_digest(rows: Iterable[dict[str, Any]]) -> str:
    """sha256 hex of the canonical rows: required columns only, sorted keys, one JSON per line."""
    h = hashlib.sha256()
    for row in rows:
        canon = {c: row.get(c) for c in REQUIRED_COLUMNS}
        h.update(json.dumps(canon, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str).encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()


def write_jsonl(rows: Iterable[dict[str, Any]], path: str | Path) -> Path:
    """Write rows as UTF-8 JSON Lines atomically (temp file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Read a JSON Lines file of objects (as written by ``write_jsonl``); DataFormatError if malformed."""
    path = Path(path)
    if not path.exists():
        raise DataSourceError(f"{path}: file not found", transient=False)
    rows, _ = _parse_jsonl(_decode(path, path.read_bytes()), path)
    return rows


# -- remote sources -----------------------------------------------------------------


def _remote_error(source: str, subset: str | None, split: str, exc: BaseException) -> DataSourceError:
    detail = " ".join(str(exc).split())[:200] or "no detail"
    where = f"subset={subset!r}, split={split!r}"
    return DataSourceError(
        f"cannot fetch dataset '{source}' ({where}): {type(exc).__name__}: {detail}. "
        "Check the network and the dataset id, or set data.source to a local .jsonl/.parquet file (or 'sample')"
    )


def _load_modelscope(
    src: Source, subset: str | None, split: str, cache_dir: str | None
) -> tuple[list[dict[str, Any]], str]:
    source, dataset_id = src.uri(), src.repo_id
    kwargs: dict[str, Any] = {"subset_name": subset, "split": split}
    if src.revision:
        kwargs["version"] = src.revision
    if cache_dir:
        kwargs["cache_dir"] = cache_dir
    try:
        from modelscope.msdatasets import MsDataset

        ds = MsDataset.load(dataset_id, **kwargs)
        hf_ds = ds.to_hf_dataset() if hasattr(ds, "to_hf_dataset") else ds
        rows = [dict(r) for r in hf_ds]
    except Exception as exc:  # network, hub and cache failures all mean "cannot fetch"
        raise _remote_error(source, subset, split, exc) from exc
    return rows, f"{source} [{split}]"


def _load_hf(
    src: Source, subset: str | None, split: str, cache_dir: str | None
) -> tuple[list[dict[str, Any]], str]:
    source, dataset_id = src.uri(), src.repo_id
    try:
        import datasets

        ds = datasets.load_dataset(dataset_id, subset, split=split, revision=src.revision, cache_dir=cache_dir)
        rows = [dict(r) for r in ds]
    except Exception as exc:
        raise _remote_error(source, subset, split, exc) from exc
    return rows, f"{source} [{split}]"


_NOT_FILES = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISSOCK, "a socket"),
              (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def require_regular_file(path: Path) -> None:
    """Refuse a data source that exists but is not a regular file, before anything opens it: reading a FIFO blocks
    until a writer comes (forever), and a device never ends. `validate` (ingest) and `run` (preflight) both ask here."""
    mode = path.stat().st_mode
    kind = next((name for test, name in _NOT_FILES if test(mode)), None)
    if kind is not None:
        raise DataSourceError(f"{path}: is {kind}, not a file; data.source must name a "
                              f"{', '.join(LOCAL_SUFFIXES)} file", transient=False)


def _missing_file_message(source: str, path: Path) -> str:
    msg = f"{path}: file not found"
    if "/" in source and not path.suffix and not source.startswith(("/", ".", "~", "file://")):
        msg += f" (for a hub dataset write 'modelscope://{source}' or 'hf://{source}')"
    return msg


# -- local files --------------------------------------------------------------------


def _read_local(path: Path) -> tuple[list[dict[str, Any]], list[int]]:
    suffix = path.suffix.lower()
    if suffix not in LOCAL_SUFFIXES:
        raise DataFormatError(f"{path}: unsupported file type '{suffix or '(none)'}' (use {', '.join(LOCAL_SUFFIXES)})")
    data = read_bytes(path)  # its content hash keys the ingest stage: the file is read once here
    if suffix == ".parquet":
        return _read_parquet(path, data)
    text = _decode(path, data)
    if suffix == ".csv":
        return _parse_csv(text, path)
    if suffix == ".json":
        return _parse_json(text, path)
    return _parse_jsonl(text, path)


def _line_of(data: bytes | str, offset: int) -> int:
    return data[:offset].count(b"\n" if isinstance(data, bytes) else "\n") + 1


def _decode(path: Path, data: bytes) -> str:
    """Bytes -> text, rejecting empty, binary, NUL-bearing and non-UTF-8 files with the spot named."""
    if not data:
        raise DataFormatError(f"{path}: file is empty (0 bytes)")
    for magic, kind in _BINARY_MAGIC.items():
        if data.startswith(magic):
            raise DataFormatError(f"{path}: binary file ({kind}), not text rows")
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise DataFormatError(f"{path}: file is UTF-16 encoded; convert it to UTF-8")
    head = data[:4096]
    controls = sum(1 for b in head if b < 32 and b not in (9, 10, 13))
    if controls > max(8, len(head) // 20):
        raise DataFormatError(f"{path}: binary file ({controls} control bytes in the first {len(head)}), not text rows")
    nul = data.find(b"\x00")
    if nul >= 0:
        raise DataFormatError(f"{path}: line {_line_of(data, nul)}: NUL byte at byte offset {nul}")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataFormatError(
            f"{path}: line {_line_of(data, exc.start)}: not valid UTF-8 (byte 0x{data[exc.start]:02x} "
            f"at byte offset {exc.start}); re-encode the file as UTF-8 (GBK/GB18030 source?)"
        ) from exc
    if not text.strip():
        raise DataFormatError(f"{path}: file is empty (only whitespace)")
    return text


def _check_text(value: Any, where: str) -> None:
    """Reject lone surrogates (from \\udxxx escapes): they cannot be encoded or tokenized; and values that are not
    JSON (bytes from a binary column, dates, decimals): a row holds text, numbers, lists and objects."""
    if isinstance(value, bytes):
        raise DataFormatError(f"{where}: is binary data ({len(value)} bytes), not text; store it as UTF-8 text")
    if not isinstance(value, (str, dict, list, int, float, bool, type(None))):
        raise DataFormatError(f"{where}: is a {type(value).__name__} value ({str(value)[:40]}), not text, a number, "
                              "a list or an object; store it as text")
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise DataFormatError(
                f"{where}: lone surrogate {value[exc.start]!a} at character {exc.start} (invalid Unicode escape)"
            ) from exc
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_text(k, where)
            _check_text(v, where)
    elif isinstance(value, list):
        for v in value:
            _check_text(v, where)


MAX_DEPTH = 64  # nesting a row may have (the real rows: 2, a metrics object in an object)


def _loads(text: str, where: str) -> Any:
    """`json.loads` that refuses an object with the same key twice (JSON's last-wins would silently drop one)
    and nesting past MAX_DEPTH (or past Python's recursion limit), with the spot named in one line."""
    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        seen: dict[str, Any] = {}
        for key, value in pairs:
            if key in seen:
                raise DataFormatError(f"{where}: key '{key}' appears twice in one object (which one is meant?)")
            seen[key] = value
        return seen

    try:
        obj = json.loads(text, object_pairs_hook=no_duplicates)
    except RecursionError as exc:
        raise DataFormatError(f"{where}: nested too deeply to be a row (more than {MAX_DEPTH} levels)") from exc
    if _depth(obj) > MAX_DEPTH:
        raise DataFormatError(f"{where}: nested too deeply to be a row (more than {MAX_DEPTH} levels)")
    return obj


def _depth(obj: Any) -> int:
    """Nesting depth of lists and objects, without recursion."""
    deepest, stack = 0, [(obj, 1)]
    while stack:
        node, level = stack.pop()
        if isinstance(node, dict):
            node = list(node.values())
        if isinstance(node, list):
            deepest = max(deepest, level)
            if level <= MAX_DEPTH:
                stack.extend((child, level + 1) for child in node)
    return deepest


def _as_row(obj: Any, where: str) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise DataFormatError(f"{where}: expected a JSON object, got {_json_kind(obj)}")
    for key, value in obj.items():
        _check_text(key, where)
        _check_text(value, f"{where}: field '{key}'")
    return obj


def _json_kind(obj: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(obj), "a number"
    )


def _parse_jsonl(text: str, path: Path) -> tuple[list[dict[str, Any]], list[int]]:
    lines = text.split("\n")  # not splitlines(): U+2028 may sit unescaped inside strings
    last = max(i for i, line in enumerate(lines) if line.strip())
    first = next(i for i, line in enumerate(lines) if line.strip())
    if lines[first].lstrip().startswith("["):
        try:
            if isinstance(json.loads(text), list):
                raise DataFormatError(
                    f"{path}: line {first + 1}: the file is one JSON array, not JSON Lines; "
                    "write one object per line or rename it to .json"
                )
        except json.JSONDecodeError:
            pass
    rows: list[dict[str, Any]] = []
    numbers: list[int] = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        where = f"{path}: line {i + 1}"
        try:
            obj = _loads(line, where)
        except json.JSONDecodeError as exc:
            if i == last and not text.endswith("\n") and not line.rstrip().endswith("}"):
                raise DataFormatError(f"{where}: truncated file, the last line is cut off ({exc.msg})") from exc
            raise DataFormatError(f"{where}: malformed JSON: {exc.msg} at column {exc.colno}") from exc
        rows.append(_as_row(obj, where))
        numbers.append(i + 1)
    return rows, numbers


def _parse_json(text: str, path: Path) -> tuple[list[dict[str, Any]], list[int]]:
    try:
        obj = _loads(text, str(path))
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data" and text.lstrip().startswith("{"):
            return _parse_jsonl(text, path)  # JSON Lines saved as .json
        where = "malformed JSON" if text.rstrip().endswith(("]", "}")) else "truncated file"
        raise DataFormatError(f"{path}: line {exc.lineno}: {where}: {exc.msg} at column {exc.colno}") from exc
    if isinstance(obj, dict):
        keys = ", ".join(list(obj)[:5])
        raise DataFormatError(
            f"{path}: top level is a JSON object (keys: {keys}); expected an array of row objects or JSON Lines"
        )
    if not isinstance(obj, list):
        raise DataFormatError(f"{path}: top level is {_json_kind(obj)}; expected an array of row objects")
    if not obj:
        raise DataFormatError(f"{path}: file is empty (the JSON array has no rows)")
    rows = [_as_row(item, f"{path}: row {n}") for n, item in enumerate(obj, start=1)]
    return rows, list(range(1, len(rows) + 1))


def _parse_csv(text: str, path: Path) -> tuple[list[dict[str, Any]], list[int]]:
    """CSV as spreadsheets write it: a UTF-8 BOM is dropped (by `_decode`), rows may end in CRLF, and a CRLF inside a
    quoted field is a line break (Excel and Sheets write one there), so it becomes "\\n"; a lone CR stays text, and
    validation refuses it as a control character."""
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    rows: list[dict[str, Any]] = []
    numbers: list[int] = []
    header: list[str] | None = None
    start = 1
    try:
        for record in reader:
            line, start = start, reader.line_num + 1
            if not record or (len(record) == 1 and not record[0].strip()):
                continue
            if header is None:
                header = record
                twice = sorted({name for name in header if header.count(name) > 1})
                if twice:
                    raise DataFormatError(f"{path}: line {line}: column '{twice[0]}' appears twice in the header")
                continue
            if len(record) != len(header):
                raise DataFormatError(
                    f"{path}: line {line}: expected {len(header)} fields (as in the header), got {len(record)}"
                )
            rows.append({name: value.replace("\r\n", "\n") for name, value in zip(header, record)})
            numbers.append(line)
    except csv.Error as exc:
        raise DataFormatError(f"{path}: line {reader.line_num}: bad CSV: {exc}") from exc
    if header is None:
        raise DataFormatError(f"{path}: file is empty (no CSV header)")
    if not rows:
        raise DataFormatError(f"{path}: file has a header but no rows")
    return rows, numbers


def _read_parquet(path: Path, data: bytes) -> tuple[list[dict[str, Any]], list[int]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not data:
        raise DataFormatError(f"{path}: file is empty (0 bytes)")
    try:
        parquet = pq.ParquetFile(pa.BufferReader(data))
        names = parquet.schema_arrow.names
        twice = sorted({name for name in names if names.count(name) > 1})
        if twice:
            raise DataFormatError(f"{path}: column '{twice[0]}' appears twice in the Parquet schema")
        for column in parquet.schema_arrow:
            if _holds_binary(column.type):
                raise DataFormatError(f"{path}: column '{column.name}' has the Parquet type {column.type}, not "
                                      "string: rows are text (write the column as UTF-8 strings)")
        rows = parquet.read().to_pylist()
    except DataFormatError:
        raise
    except Exception as exc:  # pyarrow raises ArrowInvalid/OSError for corrupt files
        detail = " ".join(str(exc).split())[:160]
        raise DataFormatError(f"{path}: not a readable Parquet file: {detail}") from exc
    if not rows:
        raise DataFormatError(f"{path}: file is empty (the Parquet table has no rows)")
    for n, row in enumerate(rows, start=1):
        _as_row(row, f"{path}: row {n}")
    return rows, list(range(1, len(rows) + 1))


def _holds_binary(kind: Any) -> bool:
    """A pyarrow type that is binary, or a list, struct or map with binary inside."""
    import pyarrow as pa

    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind) or pa.types.is_fixed_size_binary(kind) or (
            hasattr(pa.types, "is_binary_view") and pa.types.is_binary_view(kind)):
        return True
    return any(_holds_binary(kind.field(i).type) for i in range(getattr(kind, "num_fields", 0)))


# -- column normalisation -----------------------------------------------------------


def normalise_columns(
    rows: list[dict[str, Any]], location: str, row_numbers: list[int]
) -> tuple[list[dict[str, Any]], list[str]]:
    """Rename case/whitespace variants of the required columns; return rows and the other columns.

    A required column absent from every row is a DataFormatError naming the columns found;
    absent from some rows only, it is filled with None (validation reports those rows).
    """
    unit = "line" if location.lower().endswith((".jsonl", ".ndjson", ".csv")) else "row"
    seen: dict[str, None] = {}
    present: set[str] = set()
    out: list[dict[str, Any]] = []
    for row, number in zip(rows, row_numbers):
        new: dict[str, Any] = {}
        for key, value in row.items():
            seen.setdefault(str(key), None)
            canon = str(key).strip().lower()
            if canon in REQUIRED_COLUMNS:
                if canon in new:
                    names = ", ".join(repr(k) for k in row if str(k).strip().lower() == canon)
                    raise DataFormatError(f"{location}: {unit} {number}: two columns map to '{canon}' ({names})")
                new[canon] = value
                present.add(canon)
            else:
                new[key] = value
        out.append(new)
    for col in REQUIRED_COLUMNS:
        if col not in present:
            found = ", ".join(seen) or "none"
            close = difflib.get_close_matches(col, [k.strip().lower() for k in seen], n=1, cutoff=0.6)
            hint = f"; did you mean to rename '{close[0]}' to '{col}'?" if close else ""
            raise DataFormatError(f"'{col}' column missing in {location} (columns found: {found}){hint}")
    for row in out:
        for col in REQUIRED_COLUMNS:
            row.setdefault(col, None)
    extra = [k for k in seen if k.strip().lower() not in REQUIRED_COLUMNS]
    return out, extra
