from pathlib import Path

import pytest
import yaml

from maas.config import RunConfig, load_config, parse_override
from maas.errors import MaasInputError

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"


@pytest.mark.parametrize("preset", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_builds(preset):
    assert isinstance(load_config(preset), RunConfig)


def test_default_yaml_matches_embedded_defaults():
    assert load_config(CONFIG_DIR / "default.yaml") == RunConfig()


def test_flags_override_file_and_set_overrides_flags(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text(yaml.safe_dump({"data": {"dataset": "wine"}, "train": {"lr": 0.1}}))
    config = load_config(preset, dataset="digits", overrides=["train.lr=0.01", "model.hidden_sizes=[8, 4]"])
    assert config.data.dataset == "digits"
    assert config.train.lr == 0.01
    assert config.model.hidden_sizes == [8, 4]


def test_names_default_to_dataset():
    config = load_config(dataset="/data/churn.csv", target="y")
    assert config.experiment_name == "maas-churn"
    assert config.model_name == "maas-churn"
    # a file name holding what MLflow's model names or Prefect's deployment names refuse
    assert load_config(dataset="/data/R&D sales: v2 <50%>.csv", target="y").model_name == "maas-R-D sales- v2 -50--"


def test_parse_override_reads_yaml_values():
    assert parse_override("train.max_epochs=5") == (["train", "max_epochs"], 5)
    assert parse_override("registry.model_name=abc") == (["registry", "model_name"], "abc")


def test_a_value_that_is_not_yaml_is_taken_as_text():
    assert load_config(overrides=["schedule.monitor_cron=*/30 * * * *"]).schedule.monitor_cron == "*/30 * * * *"


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["train.lr=-1"], "train.lr"),
        (["train.lrr=1"], "unknown field 'train.lrr'"),
        (["nope=1"], "unknown field 'nope'"),
        (["nope.x=1"], "'nope' is not a config section"),
        (["model.family=rnn"], "model.family"),
        (["train.max_epochs=abc"], "train.max_epochs"),
        (["registry.champion_alias=latest"], "reserved"),
        (["registry.challenger_alias=champion"], "must differ"),
        (["compression.variants=[fp32, tiny]"], "compression.variants"),
        (["selection.policy=cheapest"], "selection.policy"),
        (["data.test_fraction=0.45", "data.val_fraction=0.45"], "below 0.8"),
        (["novalue"], "expected key=value"),
        (["schedule.train_cron=every monday"], "schedule.train_cron: not a five-field cron"),
        (["monitoring.metrics_url=127.0.0.1:3000/metrics"], "monitoring.metrics_url: not an http(s) URL"),
        (["monitoring.drift.psi_threshold=0"], "monitoring.drift.psi_threshold"),
        (["registry.model_name=team/churn"], "registry.model_name: a model name may not be empty nor hold / : % & < >"),
        (["serving.cors.allow_origins=[app.example.com]"], "serving.cors.allow_origins: 'app.example.com' is not an origin"),
        (["serving.cors.allow_origins=[https://app.example.com/predict]"], "no path"),
        (["serving.cors.allow_origins=['https://*.example.com']"], "an origin is matched as written"),
        (["serving.cors.allow_origins=['*']", "serving.cors.allow_credentials=true"], "allow_credentials needs the origins named"),
    ],
)
def test_bad_values_name_the_field_in_one_line(overrides, expected):
    with pytest.raises(MaasInputError) as error:
        load_config(overrides=overrides)
    message = str(error.value)
    assert expected in message
    assert "\n" not in message


def test_unknown_field_lists_allowed_fields():
    with pytest.raises(MaasInputError, match="allowed here: max_epochs, batch_size, lr"):
        load_config(overrides=["train.epochs=3"])


def test_missing_and_malformed_config_files(tmp_path):
    with pytest.raises(MaasInputError, match="config file not found"):
        load_config(tmp_path / "none.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("train: [unclosed")
    with pytest.raises(MaasInputError, match="not valid YAML"):
        load_config(broken)


def test_fp32_reference_is_always_built_first_and_once():
    config = load_config(overrides=["compression.variants=[int8, pruned, int8]"])
    assert config.compression.variants == ["fp32", "int8", "pruned"]


def test_set_reaches_into_mapping_sections_by_key():
    config = load_config(overrides=["serving.tiers.pro.requests_per_minute=10000", "serving.tiers.free.model=challenger"])
    assert config.serving.tiers["pro"].requests_per_minute == 10000
    assert config.serving.tiers["pro"].monthly_rows == 100_000_000  # the rest of the tier as configured
    assert config.serving.tiers["free"].model == "challenger"
    added = load_config(overrides=["serving.tiers.gold={requests_per_minute: 5, monthly_rows: 9}"])
    assert set(added.serving.tiers) == {"free", "pro", "gold"}
    with pytest.raises(MaasInputError, match="unknown field 'serving.tiers.pro.bogus'; allowed here: requests_per_minute"):
        load_config(overrides=["serving.tiers.pro.bogus=1"])
    with pytest.raises(MaasInputError, match="serving.tiers.gold.monthly_rows: Field required"):
        load_config(overrides=["serving.tiers.gold.requests_per_minute=5"])
    with pytest.raises(MaasInputError, match="'train.lr' is not a config section"):
        load_config(overrides=["train.lr.x=1"])
