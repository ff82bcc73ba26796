"""Selection policy and promotion gate: pure decisions, tested on hand-made tables."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from maas.config import RegistryConfig, SelectionConfig
from tasks.evaluate import VariantRow
from tasks.registry import ChampionScore, gate_decision, select_variant


def row(name, f1, rows_per_s, size, p99_ms=1.0):
    return VariantRow(name, {"f1_macro": f1}, rows_per_s_b64=rows_per_s, size_bytes=size, p99_ms_b1_e2e=p99_ms)


TABLE = [
    row("fp32", 0.970, 1_000_000, 50_000),
    row("pruned", 0.972, 1_010_000, 50_000),
    row("structured", 0.968, 1_800_000, 17_000),
    row("int8", 0.966, 1_200_000, 19_000),
    row("distilled", 0.950, 2_500_000, 7_000, p99_ms=0.5),
]


def test_fastest_within_tolerance_of_the_best():
    choice = select_variant(TABLE, SelectionConfig(policy="fastest", tolerance=0.005))
    assert choice.variant == "structured"  # distilled is faster but 2.2 points below the best
    assert "within 0.005" in choice.reason and choice.within_limits


def test_fastest_treats_speeds_within_the_speed_tolerance_as_a_tie():
    table = [row("fp32", 0.970, 1_000_000, 50_000), row("int8", 0.968, 1_050_000, 19_000),
             row("pruned", 0.969, 1_080_000, 50_000)]
    assert select_variant(table, SelectionConfig(policy="fastest", speed_tolerance=0.1)).variant == "fp32"
    assert select_variant(table, SelectionConfig(policy="fastest", speed_tolerance=0.0)).variant == "pruned"


def test_smallest_and_best_quality():
    assert select_variant(TABLE, SelectionConfig(policy="smallest", tolerance=0.01)).variant == "structured"
    assert select_variant(TABLE, SelectionConfig(policy="smallest", tolerance=0.03)).variant == "distilled"
    assert select_variant(TABLE, SelectionConfig(policy="best_quality")).variant == "pruned"


def test_limits_filter_first_and_are_reported_when_nothing_meets_them():
    assert select_variant(TABLE, SelectionConfig(policy="best_quality", max_latency_ms=0.6)).variant == "distilled"
    assert select_variant(TABLE, SelectionConfig(policy="fastest", max_size_bytes=20_000)).variant == "structured"
    none_fit = select_variant(TABLE, SelectionConfig(policy="best_quality", max_size_bytes=1_000))
    assert none_fit.variant == "pruned" and not none_fit.within_limits
    assert "no variant met" in none_fit.reason


REGISTRY = RegistryConfig()


def test_first_version_becomes_champion():
    decision = gate_decision(0.9, None, REGISTRY)
    assert decision.alias == "champion" and decision.promoted


def test_gate_keeps_a_better_or_equal_champion():
    worse = gate_decision(0.95, ChampionScore("3", 0.97), REGISTRY)
    assert worse.alias == "challenger" and not worse.promoted and "champion kept" in worse.reason
    tie = gate_decision(0.97, ChampionScore("3", 0.97), REGISTRY)
    assert tie.alias == "challenger"


def test_gate_promotes_only_past_min_improvement():
    assert gate_decision(0.975, ChampionScore("3", 0.97), REGISTRY).alias == "champion"
    strict = RegistryConfig(min_improvement=0.01)
    assert gate_decision(0.975, ChampionScore("3", 0.97), strict).alias == "challenger"
    promoted = gate_decision(0.99, ChampionScore("3", 0.97), strict)
    assert promoted.promoted and promoted.champion_version == "3" and promoted.champion_score == pytest.approx(0.97)


def test_a_champion_that_cannot_score_the_data_is_kept():
    decision = gate_decision(0.99, ChampionScore("2", None), REGISTRY)
    assert decision.alias == "challenger" and "cannot score" in decision.reason


def test_the_commands_maas_run_prints_paste_into_a_shell_whatever_the_models_name():
    """A file named 'My Reviews (2024).csv' names its model with spaces and parentheses."""
    import shlex

    from flows.summaries import next_commands
    from maas.cli import build_parser

    serve, bento, watch = next_commands("maas-My Reviews (2024)", "champion", "champion", "maas:abc", "/tmp/my home")
    arguments = build_parser().parse_args(shlex.split(serve.split("  serve  maas ")[1]))
    assert arguments.model == "maas-My Reviews (2024)@champion"
    assert shlex.split(bento.strip())[1] == "BENTOML_HOME=/tmp/my home"
    arguments = build_parser().parse_args(shlex.split(watch.split("  watch  maas ")[1].split("   (")[0]))
    assert arguments.overrides == ["monitoring.model=maas-My Reviews (2024)@champion"]
    assert next_commands("maas-wine", "challenger", "champion", None, None)[0] == "  serve  maas serve --model maas-wine@challenger"


def test_one_process_at_a_time_reads_and_moves_a_models_aliases(maas_home):
    """Two `maas run` of one model at once each scored 'no champion yet' and each became champion:
    registration, promote, rollback and the monitor's rollback hold the model's aliases. A second
    holder (another process, here another open of the lock) waits; another model's does not."""
    import threading
    import time

    from maas.registered import aliases_held

    order: list[str] = []

    def second(name: str) -> None:
        with aliases_held(name):
            order.append(f"second {name}")

    with aliases_held("maas-wine"):
        same, other = threading.Thread(target=second, args=("maas-wine",)), threading.Thread(target=second, args=("maas-digits",))
        same.start(), other.start()
        other.join(timeout=10)
        time.sleep(0.3)
        order.append("first done")
    same.join(timeout=10)
    assert order == ["second maas-digits", "first done", "second maas-wine"]


def test_a_row_has_one_fingerprint_however_pandas_typed_its_values():
    """A row read again from a grown file, or beside appended production rows, is known by its
    values: 30, 30.0 and '30' alike, a date at any resolution, text stripped, a missing value as one."""
    from tasks.registry import row_fingerprints

    first = pd.DataFrame({"age": [30, 41, None], "city": ["Lyon", "Oslo ", None],
                          "seen": pd.to_datetime(["2025-01-02", "2025-03-04", None]).astype("datetime64[us]")})
    again = pd.DataFrame({"age": ["30", 41.0, np.nan], "city": [" Lyon", "Oslo", np.nan],
                          "seen": pd.to_datetime(["2025-01-02", "2025-03-04", None]).astype("datetime64[ns]")},
                         index=[7, 8, 9])
    columns = ["age", "city", "seen"]
    assert (row_fingerprints(first, columns) == row_fingerprints(again, columns)).all()
    other = again.assign(age=["31", 41.0, np.nan], city=[" Lyon", "Oslo", ""])
    assert (row_fingerprints(first, columns) == row_fingerprints(other, columns)).tolist() == [False, True, True]
    assert len(set(row_fingerprints(first, columns))) == 3
    assert not (row_fingerprints(first, ["age", "city"]) == row_fingerprints(first, ["city", "age"]))[:2].any()
