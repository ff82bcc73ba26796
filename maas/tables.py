"""Reading the user's tables (CSV, TSV, Parquet): one place, one-line errors for every way a file can fail.

Training data, extra labelled rows and the monitor's ground-truth labels all come through here.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Iterator
from pathlib import Path

import pandas as pd

from maas.errors import MaasInputError

CSV_SUFFIXES = {".csv": ",", ".tsv": "\t", ".txt": ","}
# A .csv or .txt may be split by any of these: Excel writes ';' where the decimal mark is a comma.
DELIMITERS = (",", ";", "\t", "|")
PARQUET_SUFFIXES = {".parquet", ".pq"}


def listing(names: Iterable, limit: int = 12) -> str:
    """Column names for an error message: the first `limit`, then how many in all."""
    names = [str(name) for name in names]
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


# Excel writes its "CSV" on Windows in Windows-1252 (UTF-8 is a separate choice there).
ENCODINGS = ("utf-8-sig", "cp1252")


def _without_nul(path: Path, lines: Iterable[str]) -> Iterator[str]:
    """The lines, refused at the first NUL character: a binary file, whatever it decodes as."""
    for line in lines:
        if "\x00" in line:
            raise MaasInputError(f"{path}: not a text table (it holds NUL bytes)")
        yield line


def _check_csv_rectangular(path: Path, delimiter: str, encoding: str) -> None:
    """Fail on ragged rows, which pandas would silently pad with NaN when a row is short (reading
    the whole file: a UnicodeDecodeError says the encoding is wrong)."""
    try:
        with path.open(newline="", encoding=encoding) as handle:
            reader = csv.reader(_without_nul(path, handle), delimiter=delimiter)
            header = next(reader, None)
            if not header or not any(cell.strip() for cell in header):
                raise MaasInputError(f"{path}: the file is empty")
            for row in reader:
                if row and len(row) != len(header):
                    raise MaasInputError(
                        f"{path}: ragged rows: line {reader.line_num} has {len(row)} fields, "
                        f"the header has {len(header)}"
                    )
    except csv.Error:
        raise MaasInputError(f"{path}: not a text table (cannot read it as CSV)") from None


def sniff_delimiter(path: Path, suffix: str, encoding: str) -> str:
    """The delimiter that splits the header into the most fields; a tie goes to the suffix's own.
    A .tsv is always tab-separated."""
    default = CSV_SUFFIXES[suffix]
    if suffix == ".tsv":
        return default
    with path.open(newline="", encoding=encoding) as handle:
        header = handle.readline()
    fields = {delimiter: len(next(csv.reader([header], delimiter=delimiter), [])) for delimiter in DELIMITERS}
    return max(DELIMITERS, key=lambda delimiter: (fields[delimiter], delimiter == default))


def _csv_dialect(path: Path, suffix: str) -> tuple[str, str]:
    """(encoding, delimiter) of a CSV, checked rectangular in the same pass: UTF-8, else Windows-1252."""
    for encoding in ENCODINGS:
        try:
            delimiter = sniff_delimiter(path, suffix, encoding)
            _check_csv_rectangular(path, delimiter, encoding)
            return encoding, delimiter
        except UnicodeDecodeError:
            continue
    raise MaasInputError(f"{path}: not a text table (it reads neither as UTF-8 nor as Windows-1252)")


def read_table_file(path: Path) -> pd.DataFrame:
    """A CSV/TSV or Parquet file as a DataFrame, with one-line errors for every way it can fail."""
    if not path.exists():
        raise MaasInputError(f"data file not found: {path}")
    if not path.is_file():
        raise MaasInputError(f"{path}: is not a file")
    suffix = path.suffix.lower()
    if suffix not in CSV_SUFFIXES and suffix not in PARQUET_SUFFIXES:
        raise MaasInputError(f"{path}: unsupported file type '{suffix}'; use .csv, .tsv or .parquet")
    if path.stat().st_size == 0:
        raise MaasInputError(f"{path}: the file is empty")
    if suffix in PARQUET_SUFFIXES:
        try:
            frame = pd.read_parquet(path)
        except Exception as exc:  # pyarrow raises many types for a damaged file
            raise MaasInputError(f"{path}: not a readable Parquet file ({exc.__class__.__name__})") from None
    else:
        encoding, delimiter = _csv_dialect(path, suffix)
        try:  # ';' is the separator where ',' is the decimal mark (12,5): numbers are read so
            frame = pd.read_csv(path, sep=delimiter, encoding=encoding, decimal="," if delimiter == ";" else ".")
        except (pd.errors.ParserError, pd.errors.EmptyDataError, ValueError) as exc:
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
            raise MaasInputError(f"{path}: not a readable CSV table ({first_line})") from None
    if frame.shape[1] == 0:
        raise MaasInputError(f"{path}: the file has no columns")
    if frame.shape[0] == 0:
        raise MaasInputError(f"{path}: the file has a header but no data rows")
    return frame
