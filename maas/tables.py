"""Reading the user's tables (CSV, TSV, JSON records, Parquet, Excel; the text ones may come
compressed): one place, one-line errors for every way a file can fail.

Training data, extra labelled rows and the monitor's ground-truth labels all come through here.
"""

from __future__ import annotations

import csv
import itertools
import io
import re
import zipfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, NamedTuple

import pandas as pd

from maas.errors import MaasInputError

# .data/.dat: the UCI repository's files (adult.data), comma-separated; their delimiter is sniffed as a .csv's is.
CSV_SUFFIXES = {".csv": ",", ".tsv": "\t", ".txt": ",", ".data": ",", ".dat": ","}
# A .csv or .txt may be split by any of these: Excel writes ';' where the decimal mark is a comma.
DELIMITERS = (",", ";", "\t", "|")
# Columnar files pyarrow reads, by suffix: the reader and the format's name for a one-line error.
PARQUET, FEATHER = (pd.read_parquet, "Parquet"), (pd.read_feather, "Feather (Arrow IPC)")  # the second: to_feather
COLUMNAR_FILES = {".parquet": PARQUET, ".pq": PARQUET, ".feather": FEATHER, ".arrow": FEATHER, ".ipc": FEATHER}
JSON_SUFFIXES = {".json", ".jsonl", ".ndjson"}  # an array of records, or one record per line (.json either)
EXCEL_SUFFIXES = {".xlsx", ".xlsm"}  # the first sheet; openpyxl reads these (the 1997-2003 .xls it cannot)
# A CSV or JSON file as downloaded: data.csv.gz, or a .zip holding one table (as Kaggle and many portals serve them).
COMPRESSIONS = {".gz": "gzip", ".bz2": "bz2", ".xz": "xz", ".zip": "zip"}
TITLE_CELLS = 2
HEADER_SEARCH_LINES = 30  # how far down a header naming the target is looked for, below a title
SKIPPED_LINES = "maas_lines_above_header"  # frame.attrs key: lines passed over above the header
SPACED_FIELDS = "maas_skipinitialspace"  # frame.attrs key: fields follow "a, b" and were read with skipinitialspace
REPEATED_NAMES = "maas_repeated_names"  # frame.attrs key: {a name the header repeats: the names pandas gave its columns}
DECIMAL_COMMA = "maas_decimal_comma"  # frame.attrs key: the file's numbers were read with decimal mark ','
# frame.attrs key (kept by Parquet): labelled production rows leave out the columns their model ignored
MODEL_IGNORED = "maas_model_ignored_columns"
SUPPORTED = ".csv, .tsv, .txt, .data, .json, .jsonl (each also .gz, .bz2, .xz or .zip), .parquet, .feather or .xlsx"


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


def _check_csv_rectangular(table: TableFile, delimiter: str, encoding: str) -> None:
    """Fail on ragged rows, which pandas would silently pad with NaN when a row is short (reading
    the whole file: a UnicodeDecodeError says the encoding is wrong)."""
    path = table.path
    try:
        with open_text(table, encoding) as handle:
            reader = csv.reader(_without_nul(path, itertools.islice(handle, table.skip, None)), delimiter=delimiter,
                                skipinitialspace=table.spaced)  # `x, "a, b"` is two fields only so
            header = next(reader, None)
            if not header or not any(cell.strip() for cell in header):
                raise MaasInputError(f"{path}: the file is empty")
            for row in reader:
                if row and len(row) != len(header):
                    title = len(row) > len(header) and reader.line_num <= HEADER_SEARCH_LINES
                    raise MaasInputError(
                        f"{path}: ragged rows: line {reader.line_num + table.skip} has {len(row)} fields, "
                        f"the header has {len(header)}"
                        + ("; is the first line a title? the table is read from the line that names the target "
                           "column (--target)" if title else "")
                    )
    except csv.Error:
        raise MaasInputError(f"{path}: not a text table (cannot read it as CSV)") from None


def zip_member(path: Path) -> str:
    """The one file inside a .zip (a folder entry or macOS's __MACOSX/ copies aside)."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = [name for name in archive.namelist() if not name.endswith("/") and not name.startswith("__MACOSX/")]
    except (zipfile.BadZipFile, OSError):
        raise MaasInputError(f"{path}: not a readable zip file") from None
    if len(names) != 1:
        raise MaasInputError(f"{path}: a zip file must hold one table; it holds {len(names)} files"
                             + (f" ({listing(names, 5)})" if names else ""))
    return names[0]


class TableFile(NamedTuple):
    """A table file with its format resolved once: its own suffix ('.csv' for data.csv.gz), its
    compression or None, and for a .zip the one file inside."""

    path: Path
    suffix: str
    compression: str | None = None
    member: str | None = None
    skip: int = 0  # lines above the header (a report's title and date), which every read passes over
    spaced: bool = False  # every field of the header after the first starts with a space ("age, workclass")


def table_file(path: Path) -> TableFile:
    """The file's format: data.csv.gz is ('.csv', 'gzip'); a .zip is named by the file inside it
    when its own name says nothing (data.zip holding data.csv)."""
    suffix, compression = path.suffix.lower(), COMPRESSIONS.get(path.suffix.lower())
    if compression is None:
        return TableFile(path, suffix)
    inner = Path(path.stem).suffix.lower()
    if compression != "zip":
        return TableFile(path, inner, compression)
    member = zip_member(path)
    if inner not in CSV_SUFFIXES and inner not in JSON_SUFFIXES:
        inner = Path(member).suffix.lower()
    return TableFile(path, inner, compression, member)


def table_name(path: Path) -> str:
    """The table's name: the file's stem, less a compression's suffix too (churn.csv.gz: 'churn')."""
    return Path(path.stem).stem if path.suffix.lower() in COMPRESSIONS else path.stem


@contextmanager
def open_text(table: TableFile, encoding: str) -> Iterator[IO[str]]:
    """The file's text as the csv module reads it, through its compression (pandas infers the same)."""
    import bz2
    import gzip
    import lzma

    if table.compression == "zip":
        with zipfile.ZipFile(table.path) as archive, archive.open(table.member) as member:
            yield io.TextIOWrapper(member, encoding=encoding, newline="")
        return
    opener = {"gzip": gzip.open, "bz2": bz2.open, "xz": lzma.open}.get(table.compression, open)
    with opener(table.path, "rt", encoding=encoding, newline="") as handle:
        yield handle


DAMAGED_ARCHIVE = (OSError, EOFError, zipfile.BadZipFile)  # gzip.BadGzipFile and lzma.LZMAError are OSErrors


def damaged(table: TableFile, error: Exception) -> MaasInputError:
    return MaasInputError(f"{table.path}: not a readable {table.compression or 'text'} file ({error.__class__.__name__})")


def first_line(error: Exception) -> str:
    """An exception's message for a one-line error: its first line, else its type."""
    text = str(error).strip()
    return text.splitlines()[0] if text else error.__class__.__name__


def header_line(table: TableFile, encoding: str) -> str:
    """The table's header line (the first below any title lines), without its line end."""
    with open_text(table, encoding) as handle:
        return next(itertools.islice(handle, table.skip, None), "").rstrip("\r\n")


def sniff_delimiter(table: TableFile, header: str) -> str:
    """The delimiter that splits the header into the most fields; a tie goes to the suffix's own.
    A .tsv is always tab-separated."""
    default = CSV_SUFFIXES[table.suffix]
    return default if table.suffix == ".tsv" else header_delimiter(header, default)


def header_delimiter(header: str, default: str = ",") -> str:
    """The delimiter that splits a header line into the most fields; a tie goes to `default`."""
    fields = {delimiter: len(next(csv.reader([header], delimiter=delimiter), [])) for delimiter in DELIMITERS}
    return max(DELIMITERS, key=lambda delimiter: (fields[delimiter], delimiter == default))


def decimal_mark(delimiter: str) -> str:
    """';' is the separator where ',' is the decimal mark (12,5): such a file's numbers are read so."""
    return "," if delimiter == ";" else "."


def fields_follow_spaces(header: str, delimiter: str) -> bool:
    """Whether the header's delimiters are each followed by a space, as in UCI's adult.data
    ("age, workclass, ..."; its values too: " Private"). pandas would keep the spaces, in the
    column names and in every category, so `--target income` would not be found and a client
    sending "Private" would send a value training never saw: such a file is read with
    skipinitialspace=True, which only drops the spaces right after a delimiter."""
    fields = next(csv.reader([header], delimiter=delimiter), [])
    return len(fields) > 1 and all(field[:1] == " " and field.strip() for field in fields[1:])


def _encodings_to_try(table: TableFile) -> tuple[str, ...]:
    """UTF-16 when the file starts with its byte-order mark (Excel's "Unicode Text" export, tab-separated),
    else ENCODINGS in turn."""
    with open_text(table, "latin-1") as handle:  # every byte is one character: the first two are the mark, if any
        start = handle.read(2)
    return ("utf-16",) if start in ("\xff\xfe", "\xfe\xff") else ENCODINGS


def is_title(cells: Iterable[Any]) -> bool:
    """A line above a table's header: a title, a date, a blank (at most TITLE_CELLS cells filled).
    A line with more is a header or a row, so the search for the header stops there: a mistyped
    target that happens to be a value in some row must not make that row the header."""
    return sum(1 for cell in cells if str(cell).strip() and str(cell) != "nan") <= TITLE_CELLS


def header_index(rows: Iterable[list[list[str]]], column: str) -> int:
    """The position of the first row that names `column`, when only title rows (is_title) come before
    it within the first HEADER_SEARCH_LINES: a report's title and date over its table; 0 when the first
    row names it, or none does. Each row comes as its candidate splittings into cells (a CSV line by
    each delimiter, a sheet's row as it is)."""
    for index, splittings in enumerate(itertools.islice(rows, HEADER_SEARCH_LINES)):
        if any(column in cells for cells in splittings):
            return index
        if not all(is_title(cells) for cells in splittings):
            return 0
    return 0


def lines_above_header(table: TableFile, encoding: str, column: str | None) -> int:
    """A CSV's lines above the one naming `column` (header_index)."""
    if not column:
        return 0
    with open_text(table, encoding) as handle:
        return header_index(([[cell.strip() for cell in next(csv.reader([line], delimiter=delimiter), [])]
                              for delimiter in DELIMITERS] for line in handle), column)


def _csv_dialect(table: TableFile, column: str | None = None) -> tuple[str, str, TableFile, str]:
    """(encoding, delimiter, the table with its lines above the header, the header line) of a CSV,
    checked rectangular in the same pass: UTF-8, else Windows-1252 (UTF-16 by its byte-order mark)."""
    try:
        for encoding in _encodings_to_try(table):
            try:
                table = table._replace(skip=lines_above_header(table, encoding, column))
                header = header_line(table, encoding)
                delimiter = sniff_delimiter(table, header)
                table = table._replace(spaced=fields_follow_spaces(header, delimiter))
                _check_csv_rectangular(table, delimiter, encoding)
                return encoding, delimiter, table, header
            except UnicodeDecodeError:
                continue
    except DAMAGED_ARCHIVE as exc:
        raise damaged(table, exc) from None
    raise MaasInputError(f"{table.path}: not a text table (it reads neither as UTF-8 nor as Windows-1252)")


def pandas_renamed_some(columns: pd.Index) -> bool:
    """Whether a name looks like pandas' rename of a repeated one ('a.1'): then the header is read again."""
    return any(re.fullmatch(r".*\.[1-9][0-9]*", str(name)) for name in columns)


def repeated_names(header: list, columns: pd.Index) -> dict[str, list[str]]:
    """The names a header gives more than one column, each with what pandas calls those columns
    ('a', 'a.1'): the file's own name is then one column only, and requests must use pandas' names."""
    if len(header) != len(columns):
        return {}
    positions: dict[str, list[int]] = {}
    for index, name in enumerate(header):
        if name is not None and not (isinstance(name, float) and name != name):
            positions.setdefault(str(name), []).append(index)
    return {name: [str(columns[index]) for index in where] for name, where in positions.items() if len(where) > 1}


def read_excel_sheet(path: Path, sheet: str | int = 0, column: str | None = None) -> pd.DataFrame:
    """The workbook's sheet (a name, or its position from 0) as `pandas.read_excel(path, sheet_name=...)`
    reads it (what a user hands pyfunc), less wholly empty rows and unnamed empty columns: cells once
    formatted and then cleared come back as such, which would otherwise be rows of missing values
    with a missing target. When the first row does not name `column` and a row below does (a report's
    title above its table), that row is the header (`header=` that row; SKIPPED_LINES in attrs)."""
    try:
        with pd.ExcelFile(path, engine="openpyxl") as book:
            names = book.sheet_names
            position = isinstance(sheet, int) and 0 <= sheet < len(names)
            if not position and str(sheet) in names:
                sheet = str(sheet)  # a sheet named 2024, which --set data.sheet=2024 reads as a number
            elif not position:
                raise MaasInputError(f"{path}: no sheet {sheet!r} (data.sheet); its sheets: {listing(names)}")
            frame = pd.read_excel(book, sheet_name=sheet)
            if column and column not in frame.columns:
                top = pd.read_excel(book, sheet_name=sheet, header=None, nrows=HEADER_SEARCH_LINES)
                above = header_index(([[str(cell).strip() for cell in row]] for _, row in top.iterrows()), column)
                if above:
                    frame = pd.read_excel(book, sheet_name=sheet, header=above)
                    frame.attrs[SKIPPED_LINES] = above
            if pandas_renamed_some(frame.columns):
                header = pd.read_excel(book, sheet_name=sheet, header=None, nrows=1,
                                       skiprows=frame.attrs.get(SKIPPED_LINES, 0)).iloc[0].tolist()
                frame.attrs[REPEATED_NAMES] = repeated_names(header, frame.columns)
    except ImportError:
        raise MaasInputError(f"{path}: reading Excel files needs the package openpyxl (pip install openpyxl)") from None
    except MaasInputError:
        raise
    except Exception as exc:  # openpyxl and zipfile raise many types for a damaged workbook
        raise MaasInputError(f"{path}: not a readable Excel workbook ({exc.__class__.__name__})") from None
    unnamed = [name for name in frame.columns if str(name).startswith("Unnamed: ") and frame[name].isna().all()]
    kept = frame.drop(columns=unnamed).dropna(how="all").reset_index(drop=True)
    kept.attrs = frame.attrs
    return kept


def read_json_records(table: TableFile) -> pd.DataFrame:
    """Records as `pandas.read_json(path, lines=...)` reads them (pyfunc's rows are the same): an
    array of objects (.json), or one object per line, which a .json file may hold too (many exports do)."""
    path, lines = table.path, table.suffix != ".json"
    try:
        with open_text(table, "utf-8-sig") as handle:
            try:
                return pd.read_json(handle, lines=lines)
            except ValueError as exc:
                if lines or "Trailing data" not in str(exc):
                    raise
                handle.seek(0)
                return pd.read_json(handle, lines=True)
    except UnicodeDecodeError:
        raise MaasInputError(f"{path}: not a JSON table (JSON is UTF-8)") from None
    except DAMAGED_ARCHIVE as exc:
        raise damaged(table, exc) from None
    except ValueError as exc:
        raise MaasInputError(f"{path}: not a table of JSON records (an array of objects, or one object per line): "
                             f"{first_line(exc)}") from None


_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def local_path(name: str) -> Path:
    """A data file's path as given (~ expanded). A URL (https://, s3://) is one line saying to download
    it: as a path it read "data file not found: https:/host/data.csv", its // folded away."""
    if _URL.match(name):
        raise MaasInputError(f"{name}: a URL; maas reads local files: download it first (curl -LO '{name}') "
                             "and pass its path")
    return Path(name).expanduser()


def read_table_file(path: Path, sheet: str | int = 0, column: str | None = None) -> pd.DataFrame:
    """A CSV/TSV or JSON (plain or compressed), Parquet, Feather or Excel file (its `sheet`) as a DataFrame,
    with one-line errors for every way it can fail. column: a column the table must have (the
    target); a CSV or sheet whose header is below a title is read from the line that names it, and
    frame.attrs[SKIPPED_LINES] says how many lines were above it."""
    if not path.exists():
        raise MaasInputError(f"data file not found: {path}")
    if not path.is_file():
        raise MaasInputError(f"{path}: is not a file")
    if path.stat().st_size == 0:
        raise MaasInputError(f"{path}: the file is empty")
    table = table_file(path)
    suffix = table.suffix
    if suffix == ".xls":
        raise MaasInputError(f"{path}: the Excel 97-2003 format (.xls) is not read; save it as .xlsx or .csv")
    text = suffix in CSV_SUFFIXES or suffix in JSON_SUFFIXES
    if not text and (table.compression or (suffix not in COLUMNAR_FILES and suffix not in EXCEL_SUFFIXES)):
        raise MaasInputError(f"{path}: unsupported file type '{''.join(path.suffixes[-2:]) or path.name}'; "
                             f"use {SUPPORTED}")
    if suffix in EXCEL_SUFFIXES:
        frame = read_excel_sheet(path, sheet, column)
    elif suffix in JSON_SUFFIXES:
        frame = read_json_records(table)
    elif suffix in COLUMNAR_FILES:
        reader, format_name = COLUMNAR_FILES[suffix]
        try:
            frame = reader(path)
        except Exception as exc:  # pyarrow raises many types for a damaged file
            raise MaasInputError(f"{path}: not a readable {format_name} file ({exc.__class__.__name__})") from None
    else:
        encoding, delimiter, table, header = _csv_dialect(table, column)
        try:
            with open_text(table, encoding) as handle:  # a zip's one table, read past macOS's __MACOSX/ copies
                frame = pd.read_csv(handle, sep=delimiter, decimal=decimal_mark(delimiter), skiprows=table.skip,
                                    skipinitialspace=table.spaced)
            if table.skip:
                frame.attrs[SKIPPED_LINES] = table.skip
            if decimal_mark(delimiter) == ",":
                frame.attrs[DECIMAL_COMMA] = True
            if table.spaced:
                frame.attrs[SPACED_FIELDS] = True
            if pandas_renamed_some(frame.columns):
                names = next(csv.reader([header], delimiter=delimiter, skipinitialspace=table.spaced), [])
                frame.attrs[REPEATED_NAMES] = repeated_names(names, frame.columns)
        except (pd.errors.ParserError, pd.errors.EmptyDataError, ValueError) as exc:
            raise MaasInputError(f"{path}: not a readable CSV table ({first_line(exc)})") from None
    if frame.shape[1] == 0:
        raise MaasInputError(f"{path}: the file has no columns")
    if frame.shape[0] == 0:
        raise MaasInputError(f"{path}: the file has a header but no data rows")
    return frame
