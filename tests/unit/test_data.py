import datetime
import json

import numpy as np
import pandas as pd
import pytest

from deployments.request_reader import BadRequest, RequestReader
from maas.bundle import (date_parts, dates_as_days, feature_count, formatted_number, hours_of_day, transform,
                         transform_arrays)
from maas.config import DataConfig
from maas.errors import MaasInputError
from tasks.data import clean_features, find_date_format, fit_preprocessing, prepare_data


def write_csv(path, rows: list[str]):
    path.write_text("\n".join(rows) + "\n")
    return path


def table(n: int = 120, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({
        "id": np.arange(n),
        "x": rng.normal(size=n),
        "colour": rng.choice(["red", "green", "blue"], size=n),
        "flat": 7,
        "label": rng.choice(["yes", "no"], size=n),
    })


def prepared_from_csv(frame: pd.DataFrame, path):
    """(path, the prepared data, its numeric columns' specs by name) of the frame written as a CSV."""
    frame.to_csv(path, index=False)
    prepared = prepare_data(DataConfig(dataset=str(path), target="label"), seed=0)
    return path, prepared, {c["name"]: c for c in prepared.preprocessing["numeric"]}


def assert_served_as_trained(rows: pd.DataFrame, as_trained: np.ndarray, preprocessing: dict) -> RequestReader:
    """The rows, posted as JSON records, read by the service's reader into the features training read;
    returns the reader, for the test's own requests."""
    reader = RequestReader(preprocessing)
    served = reader.read(json.dumps({"rows": json.loads(rows.to_json(orient="records"))}).encode(), len(rows)).columns
    np.testing.assert_allclose(transform_arrays(served.numeric, served.categorical, served.n_rows, preprocessing),
                               as_trained, atol=1e-6)
    return reader


@pytest.mark.parametrize("name, n_classes", [("breast_cancer", 2), ("digits", 10), ("wine", 3)])
def test_builtins_split_stratified_and_disjoint(name, n_classes):
    prepared = prepare_data(DataConfig(dataset=name), seed=1)
    splits = prepared.splits
    assert len(prepared.labels) == n_classes
    assert len(splits.x_train) + len(splits.x_val) + len(splits.x_test) == prepared.n_rows
    for codes in (splits.y_train, splits.y_val, splits.y_test):
        assert set(codes) == set(range(n_classes))  # stratified: every class in every split
    assert abs(len(splits.x_test) / prepared.n_rows - 0.2) < 0.01


def test_split_is_reproducible_for_a_seed_and_differs_across_seeds():
    first = prepare_data(DataConfig(dataset="wine"), seed=3).splits
    again = prepare_data(DataConfig(dataset="wine"), seed=3).splits
    other = prepare_data(DataConfig(dataset="wine"), seed=4).splits
    pd.testing.assert_frame_equal(first.x_test, again.x_test)
    assert not first.x_test.equals(other.x_test)


def test_digits_keep_their_8x8_grid():
    prepared = prepare_data(DataConfig(dataset="digits"), seed=0)
    assert prepared.image_shape == (8, 8)
    assert len(prepared.input_schema) == 64


def test_preprocessing_is_fitted_on_train_rows_only():
    prepared = prepare_data(DataConfig(dataset="breast_cancer"), seed=0)
    first = prepared.preprocessing["numeric"][0]
    train_column = prepared.splits.x_train[first["name"]]
    assert first["mean"] == pytest.approx(train_column.mean())
    all_rows_mean = pd.concat([prepared.splits.x_train, prepared.splits.x_test])[first["name"]].mean()
    assert first["mean"] != pytest.approx(all_rows_mean)
    features = transform(prepared.splits.x_train, prepared.preprocessing)
    assert np.allclose(features.mean(0), 0, atol=1e-5)


def test_file_dataset_drops_unusable_columns_and_encodes_string_target(tmp_path):
    path = tmp_path / "t.csv"
    frame = table()
    frame["empty"] = np.nan
    frame.to_csv(path, index=False)
    prepared = prepare_data(DataConfig(dataset=str(path), target="label"), seed=0)
    assert prepared.labels == ["no", "yes"]
    assert set(prepared.dropped_columns) == {"id", "flat", "empty"}
    assert [c["name"] for c in prepared.input_schema] == ["x", "colour"]
    assert any("'id' dropped" in note for note in prepared.notes)


@pytest.mark.parametrize("suffix", [".parquet", ".feather"])
def test_parquet_and_feather_datasets(tmp_path, suffix):
    path = tmp_path / f"t{suffix}"
    frame = table()
    frame.to_parquet(path) if suffix == ".parquet" else frame.to_feather(path)
    prepared = prepare_data(DataConfig(dataset=str(path), target="label"), seed=0)
    assert prepared.n_rows == 120


def test_numeric_column_with_stray_strings_is_coerced_with_a_note(tmp_path):
    frame = table()
    frame["x"] = frame["x"].astype(object)
    frame.loc[[3, 9, 40], "x"] = "n/a?"
    path = tmp_path / "stray.csv"
    frame.to_csv(path, index=False)
    prepared = prepare_data(DataConfig(dataset=str(path), target="label"), seed=0)
    assert "column 'x': 3 non-numeric value(s) coerced to missing" in prepared.notes
    assert any(c["name"] == "x" for c in prepared.preprocessing["numeric"])


def test_a_column_of_numbers_with_a_few_codes_reads_as_numbers_and_flags_the_codes_in_training_and_serving(tmp_path):
    """Lab values: "<5", "unknown", "not done" in a quarter of the rows, past the stray-value share.
    Read as categories, such a column kept its 50 most frequent numbers and lost the rest."""
    rng = np.random.default_rng(3)
    n = 400
    dose = rng.gamma(2.0, 30, n).round(1)
    codes = rng.choice(["", "<5", "unknown", "not done"], n, p=[0.75, 0.1, 0.1, 0.05])
    frame = pd.DataFrame({"dose": np.where(codes == "", dose.astype(str), codes),
                          "colour": rng.choice(["red", "blue"], n), "label": np.where(dose > 60, "high", "low")})
    path, prepared, spec = prepared_from_csv(frame, tmp_path / "lab.csv")
    counts = pd.Series(codes[codes != ""]).value_counts()
    assert (f"column 'dose' read as numbers: its {counts.sum()} values that are not ("
            + ", ".join(f"'{code}' x{count}" for code, count in counts.items())
            + ") read as missing, which a flag feature marks") in prepared.notes
    assert spec["dose"]["coerce"] and spec["dose"]["missing_flag"] and "colour" not in spec
    raw = pd.read_csv(path).drop(columns=["label"])
    as_trained = transform(raw, prepared.preprocessing)
    assert as_trained.shape[1] == feature_count(prepared.preprocessing) == 1 + 1 + 2  # dose, its flag, colour
    np.testing.assert_array_equal(as_trained[:, 1], (codes != "").astype(np.float32))
    reader = assert_served_as_trained(raw, as_trained, prepared.preprocessing)
    served = reader.read(json.dumps({"rows": [{"dose": "unknown", "colour": "red"}, {"dose": 42.5, "colour": "red"}]}).encode(), 2)
    assert transform_arrays(served.columns.numeric, served.columns.categorical, 2, prepared.preprocessing)[:, 1].tolist() == [1, 0]


def test_a_column_of_categories_with_some_numbers_stays_categories(tmp_path):
    """Sizes S, M, L beside 10 and 12: the strings are most of the column, so it is no column of numbers."""
    rng = np.random.default_rng(5)
    frame = table(200)
    frame["size"] = rng.choice(["S", "M", "L", "10", "12"], 200)
    _, prepared, spec = prepared_from_csv(frame, tmp_path / "sizes.csv")
    assert "size" not in spec
    assert {c["name"]: c["categories"] for c in prepared.preprocessing["categorical"]}["size"] == ["10", "12", "L", "M", "S"]


def dated(n: int = 120, seed: int = 0) -> pd.DataFrame:
    """The table with a datetime column (microseconds, as Parquet gives) and ISO date strings with a
    stray value, as a CSV export has them."""
    frame = table(n, seed)
    frame["seen"] = (pd.Timestamp("2025-01-01") + pd.to_timedelta(np.arange(n) * 7, unit="h")).astype("datetime64[us]")
    frame["opened"] = [f"2024-{1 + index % 12:02d}-{1 + index % 28:02d}" for index in range(n)]
    frame.loc[5, "opened"] = "unknown"
    return frame


def test_dates_are_read_as_days_and_transform_the_same_from_any_unit_zone_or_iso_string(tmp_path):
    path = tmp_path / "dated.parquet"
    dated().to_parquet(path)
    prepared = prepare_data(DataConfig(dataset=str(path), target="label"), seed=0)
    schema = {c["name"]: c["type"] for c in prepared.input_schema}
    assert schema["seen"] == "datetime" and schema["opened"] == "datetime"
    assert "column 'seen' read as dates (days since 1970-01-01 and calendar parts)" in prepared.notes
    assert ("column 'opened' read as dates (days since 1970-01-01 and calendar parts, 1 unreadable value(s) "
            "as missing)") in prepared.notes
    spec = {c["name"]: c for c in prepared.preprocessing["numeric"]}
    assert spec["seen"]["date"] and not spec["seen"]["coerce"] and spec["opened"]["coerce"]
    assert 20089 < spec["seen"]["mean"] < 20089 + 120 * 7 / 24  # days since 1970 of 2025-01-01 onwards
    assert [part["part"] for part in spec["seen"]["parts"]] == ["month", "dayofmonth", "dayofweek", "hour"]
    assert [part["part"] for part in spec["opened"]["parts"]] == ["month", "dayofmonth", "dayofweek"]  # no times
    assert prepared.arrays.x_train.shape[1] == feature_count(prepared.preprocessing) == 3 + 4 + 3 + 3

    raw = pd.read_parquet(path).drop(columns=["label"]).head(20)
    reference = transform(raw, prepared.preprocessing)
    variants = [raw.assign(seen=raw["seen"].astype("datetime64[ns]")),
                raw.assign(seen=raw["seen"].dt.strftime("%Y-%m-%dT%H:%M:%S")),
                raw.assign(seen=raw["seen"].dt.tz_localize("UTC").dt.tz_convert("Asia/Tokyo")),
                raw.assign(seen=raw["seen"].dt.tz_localize("UTC").dt.tz_convert("America/New_York").astype(str))]
    for variant in variants:
        np.testing.assert_allclose(transform(variant, prepared.preprocessing), reference, atol=1e-6)
    missing = transform(raw.assign(opened="03/12/2024"), prepared.preprocessing)  # not ISO: missing, as in training
    imputed = (spec["opened"]["fill"] - spec["opened"]["mean"]) / spec["opened"]["scale"]
    column = [c["name"] for c in prepared.preprocessing["numeric"]].index("opened")
    np.testing.assert_allclose(missing[:, column], imputed, atol=1e-6)


def test_calendar_parts_of_dates_before_and_after_1970():
    days = dates_as_days(["2025-01-01", "2024-02-29T18:30:00", "1969-12-31T23:00:00", "2026-12-04T00:00:00+01:00"])
    parts = date_parts(days, ["month", "dayofmonth", "dayofweek", "hour"])
    np.testing.assert_allclose(parts, [[1, 1, 2, 0], [2, 29, 3, 18.5], [12, 31, 2, 23], [12, 3, 3, 23]])  # Monday 0


def test_dates_in_a_files_own_form_are_read_in_it_and_day_month_order_is_never_guessed(tmp_path):
    frame = table()
    frame["year"] = 2000 + np.arange(120) % 20
    frame["us_date"] = [f"{index % 12 + 1:02d}/{index % 28 + 1:02d}/2024" for index in range(120)]  # a 13th: month first
    frame["eu_time"] = [f"{index % 28 + 1:02d}.{index % 12 + 1:02d}.2024 {index % 24:02d}:30" for index in range(120)]
    frame["either_way"] = [f"{index % 12 + 1:02d}/{index * 5 % 12 + 1:02d}/2024" for index in range(120)]
    frame["flat_day"] = "2024-05-01"
    path = tmp_path / "codes.csv"
    frame.to_csv(path, index=False)
    prepared = prepare_data(DataConfig(dataset=str(path), target="label"), seed=0)
    schema = {c["name"]: c for c in prepared.input_schema}
    assert schema["year"]["type"] == "number" and schema.get("either_way", {}).get("type") != "datetime"
    assert schema["us_date"] == {"name": "us_date", "type": "datetime", "format": "%m/%d/%Y (e.g. 03/12/2026) or ISO 8601"}
    assert schema["eu_time"]["type"] == "datetime"
    assert "column 'us_date' read as dates (days since 1970-01-01 and calendar parts, written as %m/%d/%Y (03/12/2026))" \
        in prepared.notes
    assert any(note.startswith("column 'either_way': dates such as '01/01/2024' read as day/month and as month/day alike")
               for note in prepared.notes)
    assert prepared.dropped_columns["flat_day"] == "constant"
    spec = {c["name"]: c for c in prepared.preprocessing["numeric"]}
    assert spec["eu_time"]["date_format"] == "%d.%m.%Y %H:%M"

    # serving reads the file's form, and ISO 8601 as JSON clients write it, to the same days
    raw = pd.read_csv(path).drop(columns=["label"]).head(30)
    np.testing.assert_allclose(transform(raw, prepared.preprocessing),
                               transform(
                                   raw.assign(us_date=pd.to_datetime(raw["us_date"], format="%m/%d/%Y").dt.strftime("%Y-%m-%d"),
                                              eu_time=pd.to_datetime(raw["eu_time"], format="%d.%m.%Y %H:%M").astype(str)),
                                   prepared.preprocessing), atol=1e-6)
    row = json.loads(raw.head(1).to_json(orient="records"))[0]
    with pytest.raises(BadRequest, match=r"row 0, column 'us_date': not a date as the training file wrote them "
                                         r"\(03/12/2026\) nor an ISO 8601 date or time \('31/12/2024'\)"):
        RequestReader(prepared.preprocessing).read(json.dumps({"rows": [{**row, "us_date": "31/12/2024"}]}).encode(), 1)
    # a file sorted by date, 300 rows a day: its first 2,000 rows are all early in the month
    sorted_days = pd.Series(np.repeat(pd.date_range("2024-01-01", periods=40), 300).strftime("%d/%m/%Y"))
    assert find_date_format(sorted_days, 0.05, [], "day") == "%d/%m/%Y"
    days = dates_as_days(["12/31/2024", "2024-12-31", "31/12/2024", None], "%m/%d/%Y")
    np.testing.assert_allclose(days[:2], [20088, 20088])
    assert np.isnan(days[2:]).all()  # not in the file's form (day first), nor ISO, nor present


def test_dates_written_iso_8601_and_in_a_form_of_their_own_are_all_read_and_serve_alike(tmp_path):
    """A table merged from two systems: the dates that are not ISO 8601 decide the other form (a 17th
    makes it day first); where they cannot tell day from month, the column is still not guessed."""
    frame = table()
    days = pd.Timestamp("2024-01-01") + pd.to_timedelta(np.arange(120) * 5, unit="D")
    frame["signup"] = [day.strftime("%d/%m/%Y") if index % 3 == 0 else day.strftime("%Y-%m-%d")
                       for index, day in enumerate(days)]
    frame["unsure"] = [f"{index % 12 + 1:02d}/{index * 5 % 12 + 1:02d}/2024" if index % 2 else "2024-03-04"
                       for index in range(120)]
    path = tmp_path / "merged.csv"
    frame.to_csv(path, index=False)
    prepared = prepare_data(DataConfig(dataset=str(path), target="label"), seed=0)
    schema = {c["name"]: c for c in prepared.input_schema}
    assert schema["signup"]["type"] == "datetime" and schema.get("unsure", {}).get("type") != "datetime"
    assert "column 'signup': dates written two ways, 80 as ISO 8601 and 40 as %d/%m/%Y (12/03/2026); both read" \
        in prepared.notes
    raw = pd.read_csv(path).drop(columns=["label"])
    as_iso = raw.assign(signup=[day.strftime("%Y-%m-%d") for day in days])
    np.testing.assert_allclose(transform(raw, prepared.preprocessing), transform(as_iso, prepared.preprocessing),
                               atol=1e-6)
    column = [c for c in prepared.preprocessing["numeric"] if c["name"] == "signup"][0]
    np.testing.assert_allclose(dates_as_days(raw["signup"], column["date_format"]),
                               ((days - pd.Timestamp("1970-01-01")) / pd.Timedelta(days=1)).to_numpy())
    row, reader = json.loads(raw.head(1).to_json(orient="records"))[0], RequestReader(prepared.preprocessing)
    day_first, iso = (reader.read(json.dumps({"rows": [{**row, "signup": value}]}).encode(), 1).columns.numeric
                      for value in ("17/03/2024", "2024-03-17"))
    assert not np.isnan(day_first).any()
    np.testing.assert_array_equal(day_first, iso)


@pytest.mark.parametrize("written, decimal, number", [
    ("$1,200.50", ".", 1200.5), ("(1,200)", ".", -1200), ("12.5%", ".", 0.125), ("-$5", ".", -5), ("$-5.5", ".", -5.5),
    ("USD 1,000", ".", 1000), ("1'234.5", ".", 1234.5), ("1.200,50 €", ",", 1200.5), ("€ -1.200,00", ",", -1200),
    ("1 000,5", ",", 1000.5), ("1.200", ",", 1200), (".5", ".", 0.5), ("\u22123.5%", ".", -0.035), (7, ",", 7.0),
    ("1,2,3", ".", None), ("1,23", ".", None), ("1.5", ",", None), ("5 kg", ".", None), ("$", ".", None), ("", ".", None),
])
def test_a_number_written_with_currency_percent_or_group_marks_reads_as_its_value(written, decimal, number):
    value = formatted_number(written, decimal)
    assert (np.isnan(value) if number is None else value == pytest.approx(number))


def test_columns_of_money_percentages_and_decimal_commas_train_as_numbers_and_serve_the_same(tmp_path):
    rng = np.random.default_rng(4)
    n = 200
    revenue, growth, weight = rng.lognormal(7, 1, n), rng.normal(0, 10, n), rng.uniform(500, 5000, n)
    frame = pd.DataFrame({
        "revenue": [f"${value:,.2f}" if index % 9 else f"(${value:,.2f})" for index, value in enumerate(revenue)],
        "growth": [f"{value:.1f}%" for value in growth],
        "weight": [f"{value:,.1f} kg".replace(",", "_").replace(".", ",").replace("_", ".").replace(" kg", "")
                   for value in weight],
        "label": np.where(growth > 0, "up", "down"),
    })
    frame.loc[7, "growth"] = "unknown"  # a stray value: missing, in training and serving alike
    path, prepared, spec = prepared_from_csv(frame, tmp_path / "money.csv")
    assert set(spec) == {"revenue", "growth", "weight"} and not prepared.preprocessing["categorical"]
    assert spec["revenue"]["number_format"] == {"decimal": "."} and not spec["revenue"]["coerce"]
    assert spec["weight"]["number_format"] == {"decimal": ","} and spec["growth"]["coerce"]
    assert ("column 'growth' read as numbers written with currency, percent or digit-group marks "
            "(decimal mark '.', 1 unreadable value(s) as missing)") in prepared.notes
    raw = pd.read_csv(path).drop(columns=["label"])
    cleaned = clean_features(raw, DataConfig(dataset=str(path), target="label"), []).features
    assert cleaned["growth"].abs().max() < 1 and np.isnan(cleaned.loc[7, "growth"])  # 12.5% is 0.125
    np.testing.assert_allclose(cleaned["revenue"], np.where(np.arange(n) % 9, 1, -1) * revenue.round(2), rtol=1e-9)
    np.testing.assert_allclose(cleaned["weight"], weight.round(1), rtol=1e-9)

    as_trained = transform(cleaned, prepared.preprocessing)  # the numbers training read, through the bundle
    np.testing.assert_allclose(transform(raw, prepared.preprocessing), as_trained, atol=1e-6)
    reader = assert_served_as_trained(raw, as_trained, prepared.preprocessing)
    as_numbers = reader.read(json.dumps({"rows": [{"revenue": 1200.5, "growth": "unknown", "weight": 700}]}).encode(), 1)
    assert np.isnan(as_numbers.columns.numeric[0, 1]) and as_numbers.columns.numeric[0, 0] == 1200.5
    with pytest.raises(BadRequest, match="row 0, column 'revenue': .*not a number as the training file wrote them"):
        reader.read(json.dumps({"rows": [{"revenue": "lots", "growth": "1%", "weight": "1,5"}]}).encode(), 1)


@pytest.mark.parametrize("delimiter", [";", "\t", "|"])
def test_a_csv_split_by_another_delimiter_is_read_and_semicolon_files_take_decimal_commas(tmp_path, delimiter):
    frame = table()
    path = tmp_path / "sep.csv"
    rows = [delimiter.join(["x", "colour", "label"])]
    for x, colour, label in zip(frame["x"], frame["colour"], frame["label"]):
        number = f"{x:.3f}".replace(".", ",") if delimiter == ";" else f"{x:.3f}"
        rows.append(delimiter.join([number, colour, label]))
    write_csv(path, rows)
    prepared = prepare_data(DataConfig(dataset=str(path), target="label"), seed=0)
    assert {c["name"]: c["type"] for c in prepared.input_schema} == {"x": "number", "colour": "string"}
    assert prepared.preprocessing["numeric"][0]["scale"] == pytest.approx(frame["x"].std(ddof=0), rel=0.05)
    assert not any("coerced" in note for note in prepared.notes)
    # pandas reads a ';' file's rows with sep alone as strings ("1,234"): they answer as the numbers trained
    as_read = pd.read_csv(path, sep=delimiter).drop(columns=["label"])
    as_trained = transform(pd.read_csv(path, sep=delimiter, decimal="," if delimiter == ";" else ".")
                           .drop(columns=["label"]), prepared.preprocessing)
    np.testing.assert_allclose(transform(as_read, prepared.preprocessing), as_trained, atol=1e-6)
    assert_served_as_trained(as_read, as_trained, prepared.preprocessing)
    decimal_comma = [note for note in prepared.notes if "decimal mark ','" in note]
    if delimiter == ";":
        assert pd.api.types.is_string_dtype(as_read["x"])
        assert prepared.preprocessing["numeric"][0]["number_format"] == {"decimal": ","} and len(decimal_comma) == 1
    else:
        assert "number_format" not in prepared.preprocessing["numeric"][0] and not decimal_comma


def test_dots_in_a_semicolon_file_are_read_as_the_column_writes_them_and_served_the_same(tmp_path):
    # A ';' file's numbers use decimal mark ','; pandas leaves a column written "2.3" (a merged source)
    # or "12.500" (dots between digit groups) as text. Training read "2.3" as 2.3 and then serving,
    # told the column's mark was ',', refused it; "12.500" trained as 12.5 and served as 12500.
    rng = np.random.default_rng(11)
    n = 160
    tenure, amount = rng.uniform(0, 9, n).round(1), rng.integers(2, 180, n) * 500
    rows = ["id;tenure;amount;score;label"]
    for index in range(n):
        score = f"{rng.normal():.2f}".replace(".", ",")
        rows.append(f"{index:05d};{tenure[index]};{amount[index]:,}".replace(",", ".") + f";{score};"
                    + ("long" if tenure[index] > 4.5 else "short"))
    path = tmp_path / "merged.csv"
    write_csv(path, rows)
    prepared = prepare_data(DataConfig(dataset=str(path), target="label"), seed=0)
    spec = {c["name"]: c for c in prepared.preprocessing["numeric"]}
    assert set(spec) == {"tenure", "amount", "score"}  # the zero-padded IDs still dropped as IDs
    assert spec["tenure"]["number_format"] == {"decimal": "."} and spec["amount"]["number_format"] == {"decimal": ","}
    assert f"column 'tenure': numbers written with decimal mark '.' ({tenure[0]}), unlike the file's ','; read so" \
        in prepared.notes
    assert any(note.startswith("column 'amount': '.' read as the digit-group mark (") for note in prepared.notes)
    raw = pd.read_csv(path, sep=";", decimal=",").drop(columns=["label"])
    cleaned = clean_features(raw, DataConfig(dataset=str(path), target="label"), [], decimal_comma=True).features
    np.testing.assert_allclose(cleaned["tenure"], tenure)
    np.testing.assert_allclose(cleaned["amount"], amount)
    as_trained = transform(cleaned, prepared.preprocessing)
    np.testing.assert_allclose(transform(raw, prepared.preprocessing), as_trained, atol=1e-6)
    as_strings = pd.read_csv(path, sep=";", dtype=str).drop(columns=["label"])  # every value as the file wrote it
    assert_served_as_trained(as_strings, as_trained, prepared.preprocessing)


def test_a_header_repeated_inside_the_table_by_files_joined_one_after_another_is_dropped(tmp_path):
    frame = table()
    first, second = tmp_path / "a.csv", tmp_path / "b.csv"
    frame.iloc[:60].to_csv(first, index=False)
    frame.iloc[60:].to_csv(second, index=False)
    path = tmp_path / "joined.csv"
    path.write_text(first.read_text() + second.read_text() + second.read_text().split("\n", 1)[0] + "\n")
    # the error mode would refuse a table with a one-row class named after the target
    prepared = prepare_data(DataConfig(dataset=str(path), target="label", rare_classes="error"), seed=0)
    assert "joined.csv: 2 row(s) repeat the header (files joined one after another): dropped" in prepared.notes
    assert prepared.labels == sorted(frame["label"].unique()) and prepared.n_rows == len(frame)
    assert not any("coerced" in note for note in prepared.notes)
    assert {c["name"] for c in prepared.preprocessing["numeric"]} == {"x"}
    alone = prepare_data(DataConfig(dataset=str(first), target="label"), seed=0)
    assert not any("repeat the header" in note for note in alone.notes)


@pytest.mark.parametrize("written, hours", [
    ("14:30", 14.5), ("07:05", 7 + 5 / 60), ("14:30:36", 14.51), ("9:15:00.250", 9.25), ("2:30 PM", 14.5),
    ("12:00 am", 0.0), ("12:15 p.m.", 12.25), ("24:00", 24.0), (datetime.time(18, 45), 18.75), (14.5, 14.5),
    ("36:15", 36.25), ("25:61", None), ("13:00 PM", None), ("7:5", None), ("3:1", None), ("noon", None), ("", None), (None, None),
])
def test_a_time_of_day_reads_as_hours_since_midnight(written, hours):
    value = hours_of_day(written)
    assert (np.isnan(value) if hours is None else value == pytest.approx(hours))


def test_a_column_of_times_of_day_trains_as_hours_and_serves_the_same(tmp_path):
    # Before, "14:30:07" strings were many distinct values that pandas reads as no dates: dropped as
    # ID-like, though the hour was what the label turned on.
    rng = np.random.default_rng(5)
    n = 240
    seconds = rng.integers(0, 86_400, n)
    frame = pd.DataFrame({
        "x": rng.normal(size=n),
        "at": [f"{s // 3600:02d}:{s % 3600 // 60:02d}:{s % 60:02d}" for s in seconds],
        "booked": [datetime.time(s // 3600, s % 3600 // 60).strftime("%I:%M %p") for s in seconds],
        "label": np.where(seconds > 43_200, "afternoon", "morning"),
    })
    frame.loc[3, "booked"] = "unknown"  # a stray value: missing, in training and serving alike
    path, prepared, spec = prepared_from_csv(frame, tmp_path / "times.csv")
    assert spec["at"]["time_of_day"] and spec["booked"]["time_of_day"] and spec["booked"]["coerce"]
    assert "column 'at' read as times, h:mm[:ss] in hours (14:30 and 2:30 PM are 14.5)" in prepared.notes
    cleaned = clean_features(pd.read_csv(path).drop(columns=["label"]), DataConfig(dataset=str(path)), []).features
    np.testing.assert_allclose(cleaned["at"], seconds / 3600)
    assert np.isnan(cleaned.loc[3, "booked"]) and cleaned["booked"].drop(3).max() < 24
    raw = pd.read_csv(path).drop(columns=["label"])
    as_trained = transform(cleaned, prepared.preprocessing)
    np.testing.assert_allclose(transform(raw, prepared.preprocessing), as_trained, atol=1e-6)
    reader = assert_served_as_trained(raw, as_trained, prepared.preprocessing)
    as_hours = reader.read(json.dumps({"rows": [{"x": 0, "at": 14.5, "booked": "later"}]}).encode(), 1).columns
    assert as_hours.numeric[0, 1] == 14.5 and np.isnan(as_hours.numeric[0, 2])
    with pytest.raises(BadRequest, match="row 0, column 'at': .*not a time of day as the training file wrote them"):
        reader.read(json.dumps({"rows": [{"x": 0, "at": "25:61", "booked": "2:30 PM"}]}).encode(), 1)
    assert {c["name"]: c.get("format", "") for c in prepared.input_schema}["at"].startswith("a time of day")
    as_objects = raw.assign(at=[datetime.time(s // 3600, s % 3600 // 60, s % 60) for s in seconds])  # Parquet's
    np.testing.assert_allclose(transform(as_objects, prepared.preprocessing), as_trained, atol=1e-6)


def test_a_parquet_column_of_lists_is_dropped_by_name_and_a_target_of_lists_refused(tmp_path):
    frame = table()
    frame["tags"] = [["a", "b"][: index % 3] for index in range(120)]
    path = tmp_path / "nested.parquet"
    frame.to_parquet(path)
    prepared = prepare_data(DataConfig(dataset=str(path), target="label"), seed=0)
    assert prepared.dropped_columns["tags"] == "holds lists or mappings, not single values"
    with pytest.raises(MaasInputError, match="target column 'tags' holds lists or mappings"):
        prepare_data(DataConfig(dataset=str(path), target="tags"), seed=0)


def test_a_many_valued_category_keeps_its_most_frequent_values_and_a_mostly_distinct_one_is_dropped(tmp_path):
    rng = np.random.default_rng(0)
    frame = table(600)
    frame["city"] = [f"city{int(index)}" for index in rng.zipf(1.3, 600) % 150]
    frame["email"] = [f"user{index}@example.org" for index in range(550)] + ["shared@example.org"] * 50
    path = tmp_path / "cities.csv"
    frame.to_csv(path, index=False)
    prepared = prepare_data(DataConfig(dataset=str(path), target="label", max_category_levels=20), seed=0)
    assert prepared.dropped_columns["email"] == "551 distinct values in 600 rows (ID-like)"
    # mostly distinct phrases of a few words (titles) are dropped too, with how to read them as text
    frame["Order title"] = [f"{rng.choice(['red', 'blue'])} shoes {index}" for index in range(600)]
    frame.to_csv(path, index=False)
    prepared = prepare_data(DataConfig(dataset=str(path), target="label", max_category_levels=20), seed=0)
    assert prepared.dropped_columns["Order title"] == (
        "unique per row (ID-like); its values are phrases of 3.0 words on average: to read it as text, "
        "name it in data.text_columns (--set 'data.text_columns=[Order title]')")
    assert prepared.dropped_columns["email"] == "551 distinct values in 600 rows (ID-like)"
    n_cities = frame["city"].nunique()
    assert (f"column 'city': {n_cities} categories; the 20 most frequent in training are kept, the rest read as one "
            "unknown category (data.max_category_levels)") in prepared.notes
    # phrases repeated too often for text, too many for categories: the note says how to read them as text
    frame["review"] = [f"{rng.choice(['late', 'fine', 'broken'])} delivery, box {index % 20}" for index in range(600)]
    frame.to_csv(path, index=False)
    reviews = prepare_data(DataConfig(dataset=str(path), target="label", max_category_levels=20), seed=0)
    n_reviews = frame["review"].nunique()
    assert (f"column 'review': {n_reviews} categories; the 20 most frequent in training are kept, the rest read as one "
            "unknown category (data.max_category_levels); its values are phrases of 4.0 words on average: to read it "
            "as text, name it in data.text_columns (--set 'data.text_columns=[review]')") in reviews.notes
    city = next(c for c in prepared.preprocessing["categorical"] if c["name"] == "city")
    counts = prepared.splits.x_train["city"].value_counts()
    assert len(city["categories"]) == 20 and set(city["categories"]) == set(counts.index[:20])
    rare = counts.index[-1]
    encoded = transform(pd.DataFrame({"x": [0.0, 0.0], "colour": ["red"] * 2, "city": [rare, "never-seen"]}),
                        prepared.preprocessing)
    assert (encoded[0] == encoded[1]).all()  # a rare training value reads as a value first seen at serving


def test_infinite_values_are_read_as_missing_as_serving_reads_them(tmp_path):
    frame = table()
    frame["x"] = frame["x"].astype(object)
    frame.loc[[3, 9], "x"] = [np.inf, -np.inf]
    frame.loc[11, "x"] = "inf"  # a string pandas leaves as text: coerced, then the same
    path = tmp_path / "inf.csv"
    frame.to_csv(path, index=False)
    prepared = prepare_data(DataConfig(dataset=str(path), target="label"), seed=0)
    assert "column 'x': 3 infinite value(s) read as missing" in prepared.notes
    x = next(c for c in prepared.preprocessing["numeric"] if c["name"] == "x")
    assert all(np.isfinite([x["fill"], x["mean"], x["scale"]]))
    assert np.isfinite(prepared.arrays.x_train).all()


def test_numeric_target_labels_sort_numerically(tmp_path):
    frame = table()
    frame["label"] = np.where(np.arange(120) % 3 == 0, 10, 2)
    path = tmp_path / "n.csv"
    frame.to_csv(path, index=False)
    assert prepare_data(DataConfig(dataset=str(path), target="label"), seed=0).labels == ["2", "10"]


def test_unknown_category_and_missing_values_at_serving_time_do_not_crash():
    train = pd.DataFrame({"x": [1.0, 2.0, 3.0, np.nan], "c": ["a", "b", "a", None]})
    preprocessing = fit_preprocessing(train)
    served = pd.DataFrame({"x": [np.nan, np.inf, 2.0], "c": ["never-seen", None, "b"]})
    features = transform(served, preprocessing)
    assert features.shape == (3, 1 + 1 + 2)  # x, whether x is missing (it was in training), c's one-hot
    assert np.isfinite(features).all()
    assert features[:, 1].tolist() == [1.0, 1.0, 0.0]  # an infinity is read as missing, as in training
    assert features[0, 2:].tolist() == [0.0, 0.0]  # unknown category: all-zero one-hot
    assert features[1, 2:].tolist() == [1.0, 0.0]  # missing: the training mode 'a'


@pytest.mark.parametrize(
    "name, rows, target, expected",
    [
        ("empty.csv", None, "y", "the file is empty"),
        ("header.csv", ["a,b,y"], "y", "header but no data rows"),
        ("short.csv", ["a,b,y", "1,2,p", "1,2"], "y", "ragged rows: line 3 has 2 fields, the header has 3"),
        ("long.csv", ["a,b,y", "1,2,p", "1,2,p,4"], "y", "ragged rows: line 3 has 4 fields"),
        ("target.csv", ["a,b,y"] + ["1,2,p"] * 30, "z", "target column 'z' not found; columns: a, b, y"),
        ("case.csv", ["a,b,Churned "] + ["1,2,p"] * 30, "churned", "columns: a, b, Churned ; did you mean 'Churned '?"),
        ("typo.csv", ["amount,label"] + ["1,p"] * 30, "lable", "did you mean 'label'?"),
        ("noheader.csv", ["5.1,3.5,0"] + ["1,2,1"] * 30, "y", "every column name is a number: the file seems to have no"),
        ("noheader.data", ["39, State-gov, <=50K"] + [f"{i}, {'ab'[i % 2]}, {('<=50K', '>50K')[i % 2]}" for i in range(30)],
         "income", "the column names look like values of their columns: the file seems to have no header row"),
        ("one.csv", ["a,b,y"] + [f"{i},2,p" for i in range(30)], "y", "single class ('p')"),
        ("continuous.csv", ["a,b,y"] + [f"{i},2,{i * 0.37 + 0.01:.3f}" for i in range(80)], "y",
         "target 'y' holds continuous numbers (80 distinct values, e.g. 0.01 and 29.24): maas trains classifiers"),
        ("few.csv", ["a,b,y"] + [f"{i},2,p" for i in range(30)] + ["1,1,q"] * 2, "y", "class 'q' has 2 rows"),
        ("nofeat.csv", ["a,id,y"] + [f"1,{i},{'pq'[i % 2]}" for i in range(30)], "y",
         "no usable feature columns: 'a' constant; 'id' unique per row (ID-like)"),
        ("notarget.csv", ["a,b,y"] + [f"{i},2," for i in range(30)], "y", "target column 'y' is empty"),
        ("sheet.xlsx", ["whatever"], "y", "not a readable Excel workbook (BadZipFile)"),
        ("old.xls", ["whatever"], "y", "the Excel 97-2003 format (.xls) is not read; save it as .xlsx or .csv"),
        ("data.csv.zst", ["whatever"], "y", "unsupported file type '.csv.zst'; use .csv, .tsv, .txt, .data, .json, .jsonl (each also .gz"),
        ("data.parquet.gz", ["whatever"], "y", "unsupported file type '.parquet.gz'"),
        ("data.feather", ["whatever"], "y", "not a readable Feather (Arrow IPC) file"),
        ("data.csv.gz", ["a,b,y", "1,2,p"], "y", "not a readable gzip file (BadGzipFile)"),
        ("data.zip", ["a,b,y"], "y", "not a readable zip file"),
        ("one.json", ['{"a": 1, "y": "p"}'], "y", "not a table of JSON records (an array of objects, or one object per line)"),
        ("cut.jsonl", ['{"a": 1, "y": "p"}', '{"a": 2, "y":'], "y", "not a table of JSON records"),
    ],
)
def test_bad_files_fail_with_one_line_naming_the_problem(tmp_path, name, rows, target, expected):
    path = tmp_path / name
    if rows is None:
        path.write_text("")
    else:
        write_csv(path, rows)
    with pytest.raises(MaasInputError) as error:
        prepare_data(DataConfig(dataset=str(path), target=target), seed=0)
    assert expected in str(error.value)
    assert "\n" not in str(error.value)


def test_an_excel_csv_in_windows_1252_is_read_with_its_accents(tmp_path):
    path = tmp_path / "excel.csv"
    lines = ["montant;ville;y"] + [f"{index},5;{'Zürich' if index % 2 else 'Genève'};{'oui' if index % 3 else 'non'}"
                                   for index in range(60)]
    path.write_bytes(("\r\n".join(lines) + "\r\n").encode("cp1252"))
    prepared = prepare_data(DataConfig(dataset=str(path), target="y"), seed=0)
    assert prepared.preprocessing["categorical"][0]["categories"] == ["Genève", "Zürich"]
    assert prepared.preprocessing["numeric"][0]["name"] == "montant"


COMPRESSED = {"gz": "gzip", "bz2": "bz2", "xz": "xz", "zip": "zip"}


@pytest.mark.parametrize("suffix", ["csv.gz", "tsv.bz2", "csv.xz", "csv.zip", "zip"])
def test_a_compressed_table_reads_as_its_plain_file_does(tmp_path, suffix):
    """As downloaded: data.csv.gz, or a .zip of one table named by the file inside it."""
    from maas.tables import read_table_file

    separator = "\t" if suffix.startswith("tsv") else ";"  # sniffed inside the archive too (decimal commas with ';')
    lines = [separator.join(["montant", "ville", "y"])] + [
        separator.join([f"{index},5" if separator == ";" else f"{index}.5", "Zürich" if index % 2 else "Genève",
                        "oui" if index % 3 else "non"]) for index in range(60)]
    plain = tmp_path / ("data.tsv" if suffix.startswith("tsv") else "data.csv")
    plain.write_bytes(("\r\n".join(lines) + "\r\n").encode("cp1252"))
    packed = tmp_path / "packed" / f"data.{suffix}"
    packed.parent.mkdir()
    if suffix.endswith("zip"):
        import zipfile

        with zipfile.ZipFile(packed, "w", zipfile.ZIP_DEFLATED) as archive:
            archive.write(plain, plain.name)
            archive.writestr("__MACOSX/._data.csv", b"\x00\x05")  # what macOS's Compress adds beside it
    else:
        pd.read_csv(plain, sep=separator, encoding="cp1252", dtype=str).to_csv(
            packed, sep=separator, index=False, encoding="cp1252", compression=COMPRESSED[suffix.split(".")[-1]])
    frame = read_table_file(packed)
    pd.testing.assert_frame_equal(frame, read_table_file(plain))
    assert frame["montant"].dtype == float and set(frame["ville"]) == {"Zürich", "Genève"}
    assert DataConfig(dataset=str(packed)).short_name == "data"


@pytest.mark.parametrize("name", ["records.json", "lines.jsonl", "lines.json", "lines.ndjson.gz"])
def test_json_records_read_as_pandas_reads_them(tmp_path, name):
    """An array of objects or one object per line (a .json export often holds the latter); a list value
    is a nested column, dropped as Parquet's are; the rows are those `pandas.read_json` gives pyfunc."""
    import gzip
    import json

    from maas.tables import read_table_file

    records = [{"review": f"{'great' if index % 2 else 'dull'} film number {index}", "stars": index % 5 or None,
                "seen": f"2025-0{index % 9 + 1}-1{index % 10}", "tags": ["a", "b"][:index % 3],
                "y": "yes" if index % 2 else "no"} for index in range(60)]
    lines = name.split(".")[0] == "lines"
    text = "\n".join(json.dumps(record) for record in records) + "\n" if lines else json.dumps(records)
    path = tmp_path / name
    path.write_bytes(gzip.compress(text.encode()) if name.endswith(".gz") else text.encode())
    frame = read_table_file(path)
    pd.testing.assert_frame_equal(frame, pd.read_json(path, lines=lines))
    prepared = prepare_data(DataConfig(dataset=str(path), target="y"), seed=0)
    assert {column["name"] for column in prepared.preprocessing["numeric"]} == {"stars", "seen"}
    assert any("'tags'" in note and "lists or mappings" in note for note in prepared.notes), prepared.notes


def test_a_utf16_table_as_excel_exports_unicode_text_is_read(tmp_path):
    """Excel's "Unicode Text (*.txt)": UTF-16 with its byte-order mark, tab-separated."""
    from maas.tables import read_table_file

    lines = ["montant\tville\ty"] + [f"{index}.5\t{'Zürich' if index % 2 else '東京'}\t{'oui' if index % 3 else 'non'}"
                                      for index in range(40)]
    path = tmp_path / "export.txt"
    path.write_bytes(("\r\n".join(lines) + "\r\n").encode("utf-16"))
    frame = read_table_file(path)
    assert list(frame.columns) == ["montant", "ville", "y"] and set(frame["ville"]) == {"Zürich", "東京"}
    assert frame["montant"].dtype == float


def test_a_zip_of_several_files_names_them(tmp_path):
    import zipfile

    path = tmp_path / "export.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("train.csv", "a,y\n1,p\n")
        archive.writestr("test.csv", "a,y\n1,p\n")
    with pytest.raises(MaasInputError, match=r"a zip file must hold one table; it holds 2 files \(train.csv, test.csv\)"):
        prepare_data(DataConfig(dataset=str(path), target="y"), seed=0)


def test_an_excel_workbook_reads_its_first_sheet_as_pandas_does_less_its_empty_rows(tmp_path):
    """Dates as dates, numbers as numbers, a second sheet ignored; rows and columns once formatted and
    then cleared (openpyxl returns them empty) are not rows of missing values with a missing target."""
    from openpyxl import Workbook

    from maas.tables import read_table_file

    book = Workbook()
    sheet = book.active
    sheet.append(["amount", "city", "when", "y"])
    for index in range(40):
        sheet.append([index * 1.5, "Lyon" if index % 2 else "Nice", pd.Timestamp("2025-01-01") + pd.Timedelta(days=index),
                      "yes" if index % 3 else "no"])
    sheet.cell(row=60, column=6).number_format = "0.00"  # a formatted, empty cell beyond the table
    sheet.cell(row=60, column=6).value = None
    sheet.cell(row=30, column=1).value = None  # a gap inside the table is a missing value, kept
    notes = book.create_sheet("notes")
    for row in (["not", "a", "table"], [1, 2, 3]):
        notes.append(row)
    path = tmp_path / "book.xlsx"
    book.save(path)
    frame = read_table_file(path)
    assert list(frame.columns) == ["amount", "city", "when", "y"] and len(frame) == 40
    assert frame["amount"].isna().sum() == 1 and str(frame["when"].dtype).startswith("datetime64")
    pd.testing.assert_frame_equal(frame, pd.read_excel(path).dropna(how="all").drop(columns="Unnamed: 4", errors="ignore")
                                  .loc[:, ["amount", "city", "when", "y"]])
    prepared = prepare_data(DataConfig(dataset=str(path), target="y"), seed=0)
    assert {column["name"] for column in prepared.preprocessing["numeric"]} == {"amount", "when"}
    assert read_table_file(path, "notes").columns.tolist() == ["not", "a", "table"]
    assert read_table_file(path, 1).columns.tolist() == ["not", "a", "table"]
    with pytest.raises(MaasInputError, match=r"book.xlsx: no sheet 'Data' \(data.sheet\); its sheets: Sheet, notes"):
        prepare_data(DataConfig(dataset=str(path), target="y", sheet="Data"), seed=0)


def test_a_rare_class_is_dropped_with_a_note_or_refused_when_asked(tmp_path):
    rows = ["a,b,y"] + [f"{index},{index % 7},{'pq'[index % 2]}" for index in range(80)] + ["1,1,r"] * 3 + ["2,2,s"]
    path = write_csv(tmp_path / "rare.csv", rows)
    prepared = prepare_data(DataConfig(dataset=str(path), target="y"), seed=0)
    assert prepared.labels == ["p", "q"]
    assert len(prepared.splits.x_train) + len(prepared.splits.x_val) + len(prepared.splits.x_test) == 80
    (note,) = [note for note in prepared.notes if "data.min_rows_per_class" in note]
    assert "2 class(es) with fewer than 10 rows" in note and "'r' (3 rows), 's' (1 row)" in note
    assert "4 row(s) dropped" in note
    with pytest.raises(MaasInputError,
                       match=r"class 's' has 1 row; each class needs at least 10 \(data.min_rows_per_class\)$"):
        prepare_data(DataConfig(dataset=str(path), target="y", rare_classes="error"), seed=0)
    counts = write_csv(tmp_path / "counts.csv", ["a,y"] + [f"{index % 7},{index}" for index in range(120)])
    with pytest.raises(MaasInputError, match="class '0' has 1 row; .*; 120 classes in 120 rows: an ID or a measured "
                                             "quantity rather than classes"):
        prepare_data(DataConfig(dataset=str(counts), target="y"), seed=0)


def test_a_categorical_targets_unused_levels_are_no_classes(tmp_path):
    frame = pd.DataFrame({"x": np.arange(60.0), "y": pd.Categorical(["hi", "lo"] * 30, categories=["hi", "lo", "unused"])})
    frame.to_parquet(tmp_path / "levels.parquet")
    prepared = prepare_data(DataConfig(dataset=str(tmp_path / "levels.parquet"), target="y"), seed=0)
    assert prepared.labels == ["hi", "lo"] and not [note for note in prepared.notes if "class(es)" in note]


def test_binary_file_is_not_a_table(tmp_path):
    path = tmp_path / "image.csv"
    path.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(MaasInputError, match="not a text table"):
        prepare_data(DataConfig(dataset=str(path), target="y"), seed=0)


def test_damaged_parquet(tmp_path):
    path = tmp_path / "bad.parquet"
    path.write_text("this is not parquet")
    with pytest.raises(MaasInputError, match="not a readable Parquet file"):
        prepare_data(DataConfig(dataset=str(path), target="y"), seed=0)


def test_missing_file_and_unknown_dataset_name(tmp_path):
    with pytest.raises(MaasInputError, match="data file not found"):
        prepare_data(DataConfig(dataset=str(tmp_path / "gone.csv"), target="y"), seed=0)
    with pytest.raises(MaasInputError, match="unknown dataset 'iris'"):
        prepare_data(DataConfig(dataset="iris"), seed=0)


def test_file_needs_a_target_and_builtins_refuse_another(tmp_path):
    path = write_csv(tmp_path / "t.csv", ["a,y", "1,p"])
    with pytest.raises(MaasInputError, match="name the target column with --target"):
        prepare_data(DataConfig(dataset=str(path)), seed=0)
    with pytest.raises(MaasInputError, match="its target column is 'target'"):
        prepare_data(DataConfig(dataset="wine", target="alcohol"), seed=0)


@pytest.mark.parametrize("title", ["Sales report\nGenerated 2026-11-30\n\n", "Sales report,,,,\nGenerated 2026-11-30,,,,\n"])
def test_a_table_under_a_report_title_is_read_from_the_line_naming_the_target(tmp_path, title):
    """Exports put a title and a date above the table, with or without its delimiters; a footer's
    'Total' row leaves a numeric column numbers (no row coerced: the row has no target)."""
    frame = table(60)
    path = tmp_path / "report.csv"
    path.write_text(title + frame.to_csv(index=False) + "Total,,,,\n")  # 'Total' makes the id column text
    skipped = title.count("\n")
    prepared = prepare_data(DataConfig(dataset=str(path), target="label"), seed=0)
    assert (f"report.csv: the {skipped} line(s) above the header naming 'label' skipped (a title; pandas reads "
            f"the table so with skiprows={skipped})") in prepared.notes
    assert {c["name"] for c in prepared.input_schema} == {"x", "colour"}
    assert prepared.dropped_columns["id"] == "unique per row (ID-like)"  # as if pandas had read it as integers
    assert not any("coerced" in note for note in prepared.notes), prepared.notes
    np.testing.assert_allclose(np.sort(prepared.splits.x_train["x"]), np.sort(
        frame["x"].to_numpy()[np.isin(frame["x"], prepared.splits.x_train["x"])]))
    plain = tmp_path / "plain.csv"
    frame.to_csv(plain, index=False)  # a target mistyped as a value of some row does not make that row the header
    with pytest.raises(MaasInputError, match="target column 'red' not found; columns: id, x, colour, flat, label"):
        prepare_data(DataConfig(dataset=str(plain), target="red"), seed=0)
    unknown = ("target column 'target' not found; columns: Sales report" if "," in title else
               "ragged rows: line 4 has 5 fields, the header has 1; is the first line a title")
    with pytest.raises(MaasInputError, match=unknown):
        prepare_data(DataConfig(dataset=str(path), target="target"), seed=0)


def test_a_file_with_a_space_after_each_comma_is_read_without_it(tmp_path):
    """UCI's adult.data writes `39, State-gov, <=50K`: read as pandas would, every name and category
    would start with a space (--target income not found; a client's "Private" unknown). A quoted
    field after the space keeps its comma."""
    rng = np.random.default_rng(0)
    lines = ["age, workclass, note, income"] + [
        f"{20 + i % 50}, {rng.choice(['Private', 'State-gov', '?'])}, \"x, {i % 3}\", {('<=50K', '>50K')[i % 2]}"
        for i in range(90)]
    path = write_csv(tmp_path / "adult.data", lines)
    prepared = prepare_data(DataConfig(dataset=str(path), target="income"), seed=0)
    assert prepared.labels == ["<=50K", ">50K"]
    assert {c["name"] for c in prepared.input_schema} == {"age", "workclass", "note"}
    categories = {c["name"]: c["categories"] for c in prepared.preprocessing["categorical"]}
    assert sorted(categories["workclass"]) == ["?", "Private", "State-gov"]
    assert sorted(categories["note"]) == ["x, 0", "x, 1", "x, 2"]
    assert ("adult.data: a space follows each delimiter ('a, b'): read without it in names and values "
            "(pandas reads the table so with skipinitialspace=True)") in prepared.notes
    assert pd.read_csv(path, skipinitialspace=True).shape == (90, 4)  # the note's way reads the same table
    with pytest.raises(ValueError, match=r"missing input column\(s\): workclass, note \(the rows have ' workclass', ' note'"):
        transform(pd.read_csv(path), prepared.preprocessing)  # read without it: the names say why


def test_columns_sharing_a_name_are_told_with_the_names_pandas_gives_them(tmp_path):
    """pandas reads a header 'a,b,a' as a, b, a.1 without a word: a client would not know to send
    'a.1', and a second copy of the target is an input that may hold the answer."""
    rng = np.random.default_rng(0)
    lines = ["a,b,a,version.1,label,label"] + [
        f"{rng.normal():.3f},{rng.normal():.3f},{rng.normal():.3f},{i % 4},{('x', 'y')[i % 2]},{i % 2}" for i in range(80)]
    prepared = prepare_data(DataConfig(dataset=str(write_csv(tmp_path / "twice.csv", lines)), target="label"), seed=0)
    assert {c["name"] for c in prepared.input_schema} == {"a", "b", "a.1", "version.1", "label.1"}
    repeated = [note for note in prepared.notes if "columns are named" in note]
    assert repeated == ["twice.csv: 2 columns are named 'a': read as 'a', 'a.1', pandas' names, which requests use too",
                        "twice.csv: 2 columns are named 'label': read as 'label', 'label.1', pandas' names, which "
                        "requests use too; the target is the first, and the rest are inputs: 'label.1'"]
    frame = pd.DataFrame(rng.normal(size=(60, 3)), columns=["a", "b", "a"])
    frame["label"] = ["x", "y"] * 30
    frame.to_excel(tmp_path / "twice.xlsx", index=False)
    prepared = prepare_data(DataConfig(dataset=str(tmp_path / "twice.xlsx"), target="label"), seed=0)
    assert [note for note in prepared.notes if "columns are named" in note] == [
        "twice.xlsx: 2 columns are named 'a': read as 'a', 'a.1', pandas' names, which requests use too"]


def test_an_excel_sheet_under_a_title_is_read_from_the_row_naming_the_target(tmp_path):
    from openpyxl import Workbook

    book = Workbook()
    sheet = book.active
    sheet.append(["Quarterly loans"])
    sheet.append([])
    sheet.append(["amount", "y"])
    for index in range(40):
        sheet.append([index * 1.5, "yes" if index % 3 else "no"])
    path = tmp_path / "book.xlsx"
    book.save(path)
    prepared = prepare_data(DataConfig(dataset=str(path), target="y"), seed=0)
    assert any(note.startswith("book.xlsx: the 2 line(s) above the header naming 'y' skipped") and "header=2" in note
               for note in prepared.notes), prepared.notes
    assert prepared.n_rows == 40 and [c["name"] for c in prepared.input_schema] == ["amount"]
    assert list(pd.read_excel(path, header=2).columns) == ["amount", "y"]  # what the note tells a pyfunc caller


def test_target_labels_that_differ_only_in_case_or_spaces_are_one_class(tmp_path):
    frame = table(200)
    spellings = {"yes": ["yes", "Yes", "YES", "yes "], "no": ["no", " No"]}
    frame["label"] = [spellings[label][index % len(spellings[label])] for index, label in enumerate(frame["label"])]
    path = tmp_path / "typed.csv"
    frame.to_csv(path, index=False)
    prepared = prepare_data(DataConfig(dataset=str(path), target="label"), seed=0)
    assert prepared.labels == ["no", "yes"]
    assert any(note.startswith("target 'label': labels ") and "one class, 'yes'" in note for note in prepared.notes)
    apart = prepare_data(DataConfig(dataset=str(path), target="label", merge_label_spellings=False), seed=0)
    assert sorted(apart.labels) == sorted([" No", "YES", "Yes", "no", "yes", "yes "])


def test_arriving_ground_truth_is_spelt_as_the_models_labels():
    from tasks.prediction_log import in_model_spelling

    arriving = pd.Series(["Yes", "yes ", "NO", "maybe", "no"])
    assert in_model_spelling(arriving, ["No", "Yes"]).tolist() == ["Yes", "Yes", "No", "maybe", "No"]
    assert in_model_spelling(pd.Series(["yes", "Yes"]), ["yes", "Yes"]).tolist() == ["yes", "Yes"]  # kept apart


def test_arriving_numeric_labels_read_as_floats_are_the_models_whole_classes(tmp_path):
    """A labels file with a gap: pandas reads its classes 10, 20, 30 as 10.0, 20.0, 30.0, which the
    model (trained on whole numbers, labels '10', '20', '30') would not know, and live quality left
    every row out."""
    from tasks.prediction_log import in_model_spelling, read_ground_truth

    path = tmp_path / "labels.csv"
    pd.DataFrame({"request_id": ["a", "b", "c", "d"], "label": [30, None, 10, 7]}).to_csv(path, index=False)
    arriving = read_ground_truth(path)["label"]
    assert arriving.fillna("gap").tolist() == ["30.0", "gap", "10.0", "7.0"]
    assert in_model_spelling(arriving, ["10", "20", "30"]).fillna("gap").tolist() == ["30", "gap", "10", "7.0"]
    assert in_model_spelling(pd.Series(["0.5", " 1e1", "2"]), ["0.5", "10", "2.0"]).tolist() == ["0.5", "10", "2.0"]


def test_labelled_production_rows_keep_the_classes_of_a_numeric_target(tmp_path):
    """Classes 10/20/30 in a labels column with a gap read as 10.0/20.0/30.0; the prediction log's
    labelled rows carry the model's labels, '10' ... '30'. Appended for retraining, they are the same
    three classes, not six."""
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"x": rng.normal(size=90), "y": np.tile([10.0, 20.0, 30.0], 30)})
    frame.loc[5, "y"] = np.nan
    frame.to_csv(tmp_path / "table.csv", index=False)
    frame.head(12).assign(y=[str(label) for label in np.tile([10, 20, 30], 4)]).to_parquet(tmp_path / "labelled.parquet")
    prepared = prepare_data(DataConfig(dataset=str(tmp_path / "table.csv"), target="y",
                                       extra_paths=[str(tmp_path / "labelled.parquet")]), seed=0)
    assert prepared.labels == ["10", "20", "30"] and prepared.n_rows == 89 + 12


def test_numbers_appended_from_the_prediction_log_read_beside_the_files_written_ones():
    """A retraining run appends logged rows (numbers, as validated) to the file's (strings with a
    decimal comma): both read, the column keeps its form."""
    written = [f"{value:.2f}".replace(".", ",") + " €" for value in np.linspace(1, 50, 80)]
    column = pd.Series(written + list(np.linspace(1.5, 9.5, 20)), dtype=object)
    cleaned = clean_features(pd.DataFrame({"price": column}), DataConfig(dataset="x.csv", target="y"), [])
    assert cleaned.formats == {"price": {"number_format": {"decimal": ","}}} and not cleaned.coerced
    np.testing.assert_allclose(cleaned.features["price"], np.r_[np.linspace(1, 50, 80).round(2), np.linspace(1.5, 9.5, 20)])
