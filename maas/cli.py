"""The `maas` command line: train (`run`), look at the results (`ui`), serve (`serve`, `keys`, `usage`),
watch and retrain (`monitor`, `schedule`), govern (`promote`, `rollback`, `audit`, `purge`, `bill`)."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

from maas.errors import MaasInputError
from maas.processes import refuse_busy_port, supervise
from maas.termination import Terminated, handle_sigterm, note_sigterm_under_prefect, termination_requested

EXIT_FAILED = 1
EXIT_BAD_INPUT = 2

RUN_EXAMPLES = """examples:
  maas run                                     # breast_cancer with the embedded defaults
  maas run --dataset digits --summary s.json   # a CNN on 8x8 digits, summary as JSON
  maas run --dataset data.csv --target churned --set train.max_epochs=50
  maas run --config configs/quick.yaml --set model.hidden_sizes=[64,32]
  maas run --dataset big.parquet --target y --budget 10m   # tuning, families, training, compression in 10 minutes
  maas run --dataset export.csv.zip --target label   # a download as it came: compressed CSV/JSON, Excel (--set data.sheet=NAME)
"""

TUNE_WORKER_EXAMPLES = """examples:
  # the run, with a study storage every host reaches:
  maas run --dataset data.csv --target y --set tuning.remote_workers=true \
      --set tuning.storage=postgresql+psycopg://maas@db-host/optuna
  # on each other host (same data at the same path, MLFLOW_TRACKING_URI naming the run's tracking server):
  maas tune-worker --dataset data.csv --target y --set tuning.storage=postgresql+psycopg://maas@db-host/optuna
"""

UI_EXAMPLES = """examples:
  maas ui                 # http://127.0.0.1:5000 on the store in $MAAS_HOME (default ./.maas)
  maas ui --port 5001
"""


TRACKING_SERVER_EXAMPLES = """examples:
  maas tracking-server --backend-store-uri postgresql+psycopg://postgres@127.0.0.1:5432/mlflow \\
      --artifacts-destination /srv/mlflow-artifacts --host 0.0.0.0 --port 5000
  then, on every machine of the team:  export MLFLOW_TRACKING_URI=http://HOST:5000
"""


SERVE_EXAMPLES = """examples:
  maas serve                                   # maas-breast_cancer@champion on http://127.0.0.1:3000
  maas serve --model maas-digits@challenger --port 3001
  maas serve --model maas-wine/3 --set serving.auth=false   # no API keys (local development)
"""

KEYS_EXAMPLES = """examples:
  maas keys create alice --tier pro     # prints the key once; only its hash is stored
  maas keys create ops --scope admin --scope read:usage --expires 90d
  maas keys list
  maas keys rotate 1a2b3c4d --grace 2h  # a new secret now; the old one works 2 more hours
  maas keys revoke 1a2b3c4d --reason "laptop lost"
"""

GOVERNANCE_EXAMPLES = """examples:
  maas promote maas-wine 3 --reason "better on the March data"   # @champion -> v3, audited
  maas rollback maas-wine                      # @champion back to the version v3 replaced
  maas audit                                   # who changed what: keys, aliases, retrains, purges
  maas audit verify                            # recompute the hash chain; prints the head to keep elsewhere
  maas purge --older-than 30d                  # delete logged inputs; usage and bills stay
  maas bill --month 2026-12 --out invoices/    # per-key invoices (JSON, CSV, HTML)
"""

MONITOR_EXAMPLES = """examples:
  maas monitor                                 # one check of maas-breast_cancer@champion
  maas monitor --set monitoring.labels_path=labels.csv --set monitoring.metrics_url=http://127.0.0.1:3000/metrics
  maas monitor --dataset digits --summary check.json
"""

SCHEDULE_EXAMPLES = """examples:
  maas schedule                                # serve the training (weekly) and monitoring (hourly) deployments
  maas schedule --config configs/default.yaml --set schedule.monitor_cron="*/15 * * * *"
  PREFECT_API_URL=http://prefect:4200/api maas schedule --pool maas   # register for a work pool's workers
"""


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (the CLI contract), exit 2."""

    def error(self, message: str) -> None:
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: {message}\n")


def quiet_defaults() -> None:
    """Environment defaults for a clean, offline run; anything the user set wins."""
    # Prefect's server reports telemetry and logs an ERROR when it cannot reach the internet.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # MLflow 3 reports usage from a background thread; offline it only costs time.
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    # The temporary server's first start migrates a new database: 15-25 s on 2 busy cores, past
    # Prefect's 20 s default, which then fails the run before it begins.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    # BentoML's model store lives with the rest of the state, not in ~/bentoml.
    from maas.paths import use_embedded_bentoml_home

    use_embedded_bentoml_home()


def add_config_arguments(parser: argparse.ArgumentParser, dataset_help: str, set_example: str) -> None:
    """--config, --dataset, --target and --set: how every flow command builds its RunConfig."""
    parser.add_argument("--config", metavar="FILE", help="YAML preset (see configs/)")
    parser.add_argument("--dataset", metavar="NAME|PATH", help=dataset_help)
    parser.add_argument("--target", metavar="COLUMN", help="target column of a file dataset")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help=f"override a config field by dotted path, e.g. {set_example} (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="maas",
        description="Model as a service: dataset in; evaluated model registered in MLflow out.",
        epilog="Run 'maas COMMAND --help' for a command's options and examples.",
    )
    commands = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    run = commands.add_parser(
        "run", help="run the training flow", epilog=RUN_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Load, validate and split the data, train, evaluate, and register the model.",
    )
    add_config_arguments(run, "a built-in (breast_cancer, digits, wine, sentiment) or a table file: CSV, TSV, "
                              "JSON (also .gz, .bz2, .xz, .zip), Parquet, .xlsx", "train.lr=0.001")
    run.add_argument("--summary", metavar="FILE", help="write the run summary as JSON")
    run.add_argument("--budget", metavar="DURATION", help="the run's time budget (600, 90s, 10m, 1.5h): budget.time_s")

    worker = commands.add_parser(
        "tune-worker", help="run trials of a run's Optuna study from this host (team set-up)",
        epilog=TUNE_WORKER_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Join the study of a run started with tuning.remote_workers=true: the same config as the run "
                    "(its data must be the run's), trials until the study holds its budget, then exit.")
    add_config_arguments(worker, "the run's dataset: a built-in name or the same file", "tuning.storage=URL")
    worker.add_argument("--study", metavar="NAME", help="the study (default: tuning.study_name, else the experiment "
                                                        "name; the one the run opens for this table)")
    worker.add_argument("--wait", metavar="DURATION", default="10m", help="how long to wait for the run to open it")

    ui = commands.add_parser(
        "ui", help="the MLflow UI on the current store", epilog=UI_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ui.add_argument("--host", default="127.0.0.1")
    ui.add_argument("--port", type=port_argument, default=5000)

    tracking = commands.add_parser(
        "tracking-server", help="an MLflow tracking server on a database, proxying the artifacts (team set-up)",
        epilog=TRACKING_SERVER_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    tracking.add_argument("--backend-store-uri", required=True, help="SQLAlchemy URL of the runs and the registry")
    tracking.add_argument("--artifacts-destination", required=True, help="folder or object store URI for artifacts")
    tracking.add_argument("--host", default="127.0.0.1")
    tracking.add_argument("--port", type=port_argument, default=5000)
    tracking.add_argument("--workers", type=int, default=2)

    serve = commands.add_parser(
        "serve", help="serve a registered model with BentoML", epilog=SERVE_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Package the registered version as a BentoML model and run `bentoml serve` on it.",
    )
    serve.add_argument("--model", metavar="NAME[@ALIAS|/VERSION]", help="default: serving.model, else maas-<dataset>@champion")
    serve.add_argument("--port", type=port_argument, help="default: serving.port (3000)")
    serve.add_argument("--config", metavar="FILE", help="YAML preset (its serving section is used)")
    serve.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config field, e.g. serving.auth=false (repeatable)")

    keys = commands.add_parser("keys", help="create, list and revoke API keys", epilog=KEYS_EXAMPLES,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
    key_commands = keys.add_subparsers(dest="key_command", required=True, parser_class=OneLineParser)
    create = key_commands.add_parser("create", help="a new key for a tier (shown once)")
    create.add_argument("name", help="who the key is for")
    create.add_argument("--tier", default="free", help="a tier in serving.tiers (default: free)")
    create.add_argument("--config", metavar="FILE", help="YAML preset whose serving.tiers to check against")
    create.add_argument("--scope", dest="scopes", action="append", metavar="SCOPE",
                        help="predict (default), read:usage, admin (repeatable)")
    create.add_argument("--expires", metavar="DURATION", help="the key stops working after this long (90d, 12h)")
    key_commands.add_parser("list", help="every key: id, name, tier, scopes, state, expiry")
    revoke = key_commands.add_parser("revoke", help="revoke a key by id (takes effect within a second)")
    revoke.add_argument("key_id")
    revoke.add_argument("--reason", default="", help="written to the audit trail")
    rotate = key_commands.add_parser("rotate", help="a new secret for a key, the old one kept for a grace period")
    rotate.add_argument("key_id")
    rotate.add_argument("--grace", metavar="DURATION", help="how long the old secret keeps working "
                        "(default: serving.key_rotation_grace_s, 24h)")
    rotate.add_argument("--config", metavar="FILE", help="YAML preset whose serving section to use")

    governance = dict(epilog=GOVERNANCE_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    promote = commands.add_parser("promote", help="point an alias (default: champion) at a version, audited",
                                  **governance)
    promote.add_argument("name", help="registered model, e.g. maas-wine")
    promote.add_argument("version")
    rollback = commands.add_parser("rollback", help="move an alias back to the version its current one replaced",
                                   **governance)
    rollback.add_argument("name", help="registered model, e.g. maas-wine")
    for command in (promote, rollback):
        command.add_argument("--alias", default="champion")
        command.add_argument("--reason", default="", help="written to the audit trail")
    audit = commands.add_parser("audit", help="the audit trail: list it, or verify its hash chain", **governance)
    audit.add_argument("action", nargs="?", choices=["list", "verify"], default="list")
    audit.add_argument("--filter", metavar="ACTION", help="only actions starting with this (key, alias, retrain, log)")
    audit.add_argument("--limit", type=positive_count, metavar="N", help="the last N entries")
    audit.add_argument("--expect-head", metavar="HASH", help="verify: a head an earlier verify printed must be on the chain")
    audit.add_argument("--json", action="store_true", help="machine-readable output")
    purge = commands.add_parser("purge", help="delete logged inputs past the retention period (usage stays)",
                                **governance)
    purge.add_argument("--older-than", metavar="DURATION", help="default: serving.privacy.retention_days")
    purge.add_argument("--config", metavar="FILE", help="YAML preset whose serving section to use")
    bill = commands.add_parser("bill", help="per-key invoices for a month, from metered usage and tier prices",
                               **governance)
    bill.add_argument("--month", required=True, metavar="YYYY-MM")
    bill.add_argument("--config", metavar="FILE", help="YAML preset whose serving.tiers (prices) to use")
    bill.add_argument("--json", action="store_true", help="the invoices as JSON on stdout")
    bill.add_argument("--out", metavar="DIR", help="also write invoices-YYYY-MM.{json,csv,html} there")

    monitor = commands.add_parser(
        "monitor", help="one check of the served model: drift, live quality, health, alerts", epilog=MONITOR_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Compare the prediction log since the last check with the model's training reference; "
                    "alert once per incident; trigger retraining when drift or decay passes its threshold.",
    )
    schedule = commands.add_parser(
        "schedule", help="the cron deployments: serve them here, or register them for a work pool",
        epilog=SCHEDULE_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Training and monitoring as Prefect deployments with cron schedules (schedule.*).",
    )
    for command in (monitor, schedule):
        add_config_arguments(command, "which model: maas-<dataset> by default", "monitoring.drift.psi_threshold=0.25")
    monitor.add_argument("--summary", metavar="FILE", help="write the check as JSON")
    schedule.add_argument("--pool", metavar="NAME", help="register for this work pool and exit (team set-up)")

    usage = commands.add_parser("usage", help="requests, rows and errors per key and month")
    usage.add_argument("--month", metavar="YYYY-MM", help="only this month")
    usage.add_argument("--json", action="store_true", help="machine-readable output")
    return parser


def preflight(config) -> None:
    """Check the data and the network choice before orchestration starts.

    A typo in a path or a column then costs a second and one clear line, not a Prefect server
    start and a failed flow run. The flow validates again, for runs started by a deployment.
    """
    from tasks.data import prepare_data
    from tasks.train import resolve_device, spec_for_data

    resolve_device(config.train.device)
    # fit_text=False: the encoder reads the text in the flow, not twice (with fine-tuning, minutes)
    spec_for_data(config.model, prepare_data(config.data, config.seed, fit_text=False))


def without_nan(value: Any) -> Any:
    """The summary with NaN and infinities as null, as JSON.stringify writes them: Python's json would
    write NaN and Infinity, which JSON has not, and jq and browsers refuse the file."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: without_nan(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [without_nan(item) for item in value]
    return value


def run_flow(args: argparse.Namespace, check, load_flow, what: str) -> int:
    """`maas run` and `maas monitor`: config, preflight (bad input is one line), the flow, its summary
    (TrainSummary or CheckSummary: `to_dict` for --summary, `render` for the terminal)."""
    from maas.config import load_config

    config = load_config(args.config, args.dataset, args.target, args.overrides)
    summary_path = writable_file("--summary", args.summary) if args.summary else None
    check(config)
    flow_function = load_flow(config)  # imported late: Prefect's import costs seconds that bad input should not
    note_sigterm_under_prefect()
    try:
        summary = flow_function(config)
    except MaasInputError:
        raise
    except Exception as error:  # Prefect has logged the traceback with the failed flow run
        if termination_requested():  # SIGTERM, wrapped by whoever caught it (maas/termination.py)
            raise Terminated() from error
        print(f"maas: error: the {what} flow failed: {error.__class__.__name__}: {error}", file=sys.stderr)
        return EXIT_FAILED
    print(summary.render())
    if summary_path:
        try:
            summary_path.write_text(json.dumps(without_nan(summary.to_dict()), indent=2, default=str, allow_nan=False))
        except OSError as error:  # the run is done and registered; only the file is missing
            print(f"maas: error: --summary {summary_path}: not written ({error.strerror})", file=sys.stderr)
            return EXIT_FAILED
    return 0


def writable_folder(flag: str, name: str) -> Path:
    """The folder a command writes its files in, made if it is not there yet; one line if it cannot be."""
    folder = Path(name).expanduser()
    if folder.exists() and not folder.is_dir():
        raise MaasInputError(f"{flag} {folder}: is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise MaasInputError(f"{flag} {folder}: cannot make the folder ({error.strerror})") from None
    if not os.access(folder, os.W_OK):
        raise MaasInputError(f"{flag} {folder}: not writable")
    return folder


def writable_file(flag: str, name: str) -> Path:
    """The file a command writes when it is done, its folder made now: a run that trained and
    registered for minutes, then found no folder to write its summary in, ended in a traceback."""
    path = Path(name).expanduser()
    if path.is_dir():
        raise MaasInputError(f"{flag} {path}: is a folder; name a file in it (e.g. {path / 'summary.json'})")
    writable_folder(flag, str(path.parent))
    if path.exists() and not os.access(path, os.W_OK):
        raise MaasInputError(f"{flag} {path}: not writable")
    return path


def command_run(args: argparse.Namespace) -> int:
    if args.budget is not None:
        args.overrides = [*args.overrides, f"budget.time_s={duration_argument('--budget', args.budget)}"]

    def training_flow(config):
        from tasks.families import tuning_workers_to_start
        from tasks.tune_workers import start_ahead

        start_ahead(tuning_workers_to_start(config), config.tuning)  # they import while the flow is imported and Prefect starts
        from flows.train_pipeline import train_pipeline

        return train_pipeline

    return run_flow(args, preflight, training_flow, "training")


def command_tune_worker(args: argparse.Namespace) -> int:
    from maas.config import load_config

    wait_s = duration_argument("--wait", args.wait)
    config = load_config(args.config, args.dataset, args.target, args.overrides)
    from tasks.tune_workers import remote_worker  # torch and Optuna: once the arguments are known good

    study = args.study or config.tuning.study_name or config.experiment_name
    trained = remote_worker(config, study, wait_s, lambda line: print(f"maas tune-worker: {line}", flush=True))
    print(f"maas tune-worker: study '{study}' holds its budget; {trained} trial(s) trained here")
    return 0


def command_ui(args: argparse.Namespace) -> int:
    from maas.paths import artifact_root, tracking_uri

    command = [
        sys.executable, "-m", "mlflow", "ui",
        "--backend-store-uri", tracking_uri(),
        "--default-artifact-root", artifact_root().as_uri(),
        "--host", args.host, "--port", str(args.port),
    ]
    refuse_busy_port(args.host, args.port)
    print(f"MLflow UI on http://{args.host}:{args.port} (Ctrl-C to stop)", flush=True)
    return supervise(command, dict(os.environ))


def command_tracking_server(args: argparse.Namespace) -> int:
    from maas.team import POOL_ENVIRONMENT, check_database, tracking_server_command
    from maas.tracking import redact_url

    check_database(args.backend_store_uri)
    refuse_busy_port(args.host, args.port)
    command = tracking_server_command(args.backend_store_uri, args.artifacts_destination, args.host, args.port,
                                      args.workers)
    print(f"MLflow tracking server on http://{args.host}:{args.port}, runs in {redact_url(args.backend_store_uri)}, "
          f"artifacts in {args.artifacts_destination} (Ctrl-C to stop)", flush=True)
    return supervise(command, {**os.environ, **POOL_ENVIRONMENT})


def serving_environment(packaged, serving, tier_models: dict | None = None) -> dict[str, str]:
    """The server's environment. MAAS_HOME is this command's, made absolute: the server runs in the
    checkout, where the default ./.maas is another folder, and its workers then checked keys against
    a store without them (401 for every key) and kept the prediction log where `maas monitor` did not look."""
    from maas.paths import maas_home

    tiers = {tier: {"bundle_dir": str(model.path), "label": model.label} for tier, model in (tier_models or {}).items()}
    return {**os.environ, "MAAS_HOME": str(maas_home()), "MAAS_BUNDLE_DIR": str(packaged.path),
            "MAAS_MODEL_LABEL": packaged.label,
            "MAAS_SERVING_CONFIG": serving.model_dump_json(), "MAAS_TIER_MODELS": json.dumps(tiers)}


def command_serve(args: argparse.Namespace) -> int:
    from maas.config import load_config
    from maas.paths import project_root
    from maas.registered import ModelRef
    from maas.tracking import mlflow_client
    from deployments.follower import SERVED_MODELS_ENV, RegistryFollower, served_models_file
    from tasks.package import package_model, package_tier_models

    config = load_config(args.config, None, None, args.overrides)
    serving = config.serving
    if args.port is not None:
        serving = serving.model_copy(update={"port": args.port})
    refuse_busy_port(serving.host, serving.port)
    for field in ("certfile", "keyfile"):
        path = getattr(serving.tls, field)
        if path is not None and not Path(path).is_file():
            raise MaasInputError(f"serving.tls.{field}: no file at {path}")
        if path is not None:  # the server runs in the checkout: a path relative to here is resolved here
            resolved = serving.tls.model_copy(update={field: str(Path(path).resolve())})
            serving = serving.model_copy(update={"tls": resolved})
    from maas.privacy import redactor_for

    redactor_for(serving.privacy)  # a privacy policy whose secret is missing stops here, not in each worker
    if serving.limits_backend == "redis":
        from deployments.redis_limits import check_reachable

        check_reachable(serving.redis_url)
    client = mlflow_client()
    champion = config.registry.champion_alias
    wanted = ModelRef.parse(args.model or serving.model or f"{config.model_name}@{champion}", champion)
    packaged = package_model(client, wanted)
    tier_models, missing = package_tier_models(client, packaged.ref.name, serving)
    if missing:  # asked for by name: a tier's missing model stops `maas serve`
        raise next(iter(missing.values()))
    scheme = "https" if serving.tls.enabled else "http"
    print(f"Serving {packaged.label} (BentoML model {packaged.tag}) on {scheme}://{serving.host}:{serving.port} "
          f"(auth {'on' if serving.auth else 'off'}; Ctrl-C to stop)", flush=True)
    for tier, model in tier_models.items():
        print(f"  tier {tier}: {model.label}", flush=True)
    command = [sys.executable, "-m", "bentoml", "serve", "deployments.service:MaasService",
               "--host", serving.host, "--port", str(serving.port),
               # uvicorn's default of 5 s equals httpx's own expiry: a request sent on a connection the server
               # was closing got a reset (ReadError) under load. The server must keep connections longer.
               "--timeout-keep-alive", str(serving.keep_alive_s)]
    follower = RegistryFollower(client, wanted, serving, served_models_file(serving.port), packaged, tier_models)
    environment = {**serving_environment(packaged, serving, tier_models), SERVED_MODELS_ENV: str(follower.path)}
    return supervise(command, environment, cwd=str(project_root()), on_tick=follower.tick)


def _whole_number(text: str, noun: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a {noun}") from None


def port_argument(text: str) -> int:
    """A TCP port: one line for 99999 (the socket's bind raised OverflowError, a traceback)."""
    port = _whole_number(text, "port number")
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port (1 to 65535)")
    return port


def positive_count(text: str) -> int:
    """A count of 1 or more: --limit 0 listed every entry, and -1 every one but the first."""
    count = _whole_number(text, "whole number")
    if count < 1:
        raise argparse.ArgumentTypeError(f"{count}: at least 1")
    return count


def duration_argument(flag: str, text: str) -> float:
    from maas.budget import parse_duration

    try:
        return parse_duration(text)
    except ValueError as error:
        raise MaasInputError(f"{flag}: {error}") from None


def command_keys(args: argparse.Namespace) -> int:
    import time

    from maas.api_keys import create_key, list_keys, parse_scopes, revoke_key, rotate_key
    from maas.config import load_config
    from maas.service_store import connect, iso

    connection = connect()
    if args.key_command == "create":
        if not args.name.strip() or len(args.name) > 200:  # as POST /admin/keys: how the list, bill and audit tell keys apart
            raise MaasInputError("a key needs a name of 1 to 200 characters: who it is for (maas keys create NAME --tier TIER)")
        tiers = load_config(args.config).serving.tiers
        if args.tier not in tiers:
            raise MaasInputError(f"--tier '{args.tier}': not a tier in serving.tiers ({', '.join(tiers)})")
        scopes = parse_scopes(args.scopes)
        expires = time.time() + duration_argument("--expires", args.expires) if args.expires else None
        key, plain = create_key(connection, args.name, args.tier, scopes, expires)
        print(f"key {key.key_id} for {key.name}, tier {key.tier}, scopes {', '.join(scopes)}"
              f"{', expires ' + iso(expires) if expires else ''}:\n{plain}\n"
              "Store it now: only its hash is kept. Send it as header X-API-Key.")
    elif args.key_command == "list":
        keys = list_keys(connection)
        if not keys:
            print("no keys yet: maas keys create NAME --tier TIER")
            return 0
        print(f"{'id':<10}{'name':<20}{'tier':<8}{'scopes':<26}{'state':<9}{'secrets':<9}{'created':<27}expires")
        for key in keys:
            print(f"{key.key_id:<10}{key.name:<20}{key.tier:<8}{','.join(key.scopes):<26}{key.state:<9}"
                  f"{key.secrets:<9}{iso(key.created_at):<27}{iso(key.expires_at)}")
    elif args.key_command == "rotate":
        grace = (duration_argument("--grace", args.grace) if args.grace
                 else load_config(args.config).serving.key_rotation_grace_s)
        plain = rotate_key(connection, args.key_id, grace)
        if plain is None:
            raise MaasInputError(f"key '{args.key_id}': no such active key (see maas keys list)")
        print(f"new secret for key {args.key_id} (works now):\n{plain}\n"
              f"The old secret keeps working until {iso(time.time() + grace)}. Store the new one now: only its hash is kept.")
    elif not revoke_key(connection, args.key_id, args.reason):
        raise MaasInputError(f"key '{args.key_id}': no such active key (see maas keys list)")
    else:
        print(f"revoked {args.key_id}")
    return 0


def refuse_bad_alias(alias: str) -> None:
    """A name MLflow refuses (a space, a slash, 'latest') is one line before anything is touched."""
    from maas.config import checked_alias

    try:
        checked_alias(alias)
    except ValueError as error:
        raise MaasInputError(f"--alias: {error}") from None


def command_promote(args: argparse.Namespace) -> int:
    from maas.registered import promote
    from maas.tracking import mlflow_client

    refuse_bad_alias(args.alias)
    require_trained_store(f"{args.name}/{args.version}")
    before = promote(mlflow_client(), args.name, args.version, args.alias, args.reason)
    print(f"{args.name}@{args.alias}: {'v' + before if before else 'unset'} -> v{args.version} (audited; a running "
          "`maas serve` follows within serving.reload_interval_s)")
    return 0


def command_rollback(args: argparse.Namespace) -> int:
    from maas.registered import rollback
    from maas.tracking import mlflow_client

    refuse_bad_alias(args.alias)
    require_trained_store(f"{args.name}@{args.alias}")
    current, previous = rollback(mlflow_client(), args.name, args.alias, args.reason)
    print(f"{args.name}@{args.alias}: v{current} -> v{previous} (rolled back, audited)")
    return 0


def command_audit(args: argparse.Namespace) -> int:
    from maas import audit
    from maas.service_store import connect

    connection = connect()
    if args.action == "verify":
        verdict = audit.verify(connection, args.expect_head)
        if args.json:
            print(json.dumps({"intact": verdict.intact, "entries": verdict.entries, "head": verdict.head,
                              "problems": verdict.problems}, indent=1))
        else:
            for problem in verdict.problems:
                print(f"audit: {problem}", file=sys.stderr)
            print(f"{'intact' if verdict.intact else 'TAMPERED'}: {verdict.entries} entries, head {verdict.head or '-'}")
        return 0 if verdict.intact else EXIT_FAILED
    found = audit.entries(connection, args.filter, args.limit)
    if args.json:
        print(json.dumps([entry.as_dict() for entry in found], indent=1))
        return 0
    if not found:
        print(f"no audit entries{f' for actions starting with {args.filter!r}' if args.filter else ''} yet")
    def shown(value) -> str:
        return "-" if value is None else value if isinstance(value, str) else json.dumps(value)

    for entry in found:
        row = entry.as_dict()
        print(f"{row['seq']:>5} {row['time']} {entry.actor:<28} {entry.action:<15} {entry.target:<24} "
              f"{shown(entry.before)} -> {shown(entry.after)}" + (f"  ({entry.reason})" if entry.reason else ""))
    return 0


def command_purge(args: argparse.Namespace) -> int:
    from maas.config import load_config
    from maas.privacy import purge_predictions
    from maas.service_store import connect_settled

    if args.older_than:
        days = duration_argument("--older-than", args.older_than) / 86_400
    else:
        days = load_config(args.config).serving.privacy.retention_days
        if days is None:
            raise MaasInputError("no retention period: pass --older-than (e.g. 30d) or set serving.privacy.retention_days")
    purged = purge_predictions(connect_settled(), days)  # what gone workers journaled goes by the same rule
    print(f"purged {purged} logged request(s) older than {days:g} days; usage counts are kept")
    return 0


def command_bill(args: argparse.Namespace) -> int:
    from maas.billing import invoices_csv, invoices_html, monthly_invoices
    from maas.config import load_config
    from maas.service_store import connect_settled

    tiers = load_config(args.config).serving.tiers
    invoices = monthly_invoices(connect_settled(), args.month, tiers)
    as_json = json.dumps([line.as_json() for line in invoices], indent=1)
    if args.out:
        folder = writable_folder("--out", args.out)
        for suffix, text in (("json", as_json), ("csv", invoices_csv(invoices)), ("html", invoices_html(invoices))):
            (folder / f"invoices-{args.month}.{suffix}").write_text(text)
    if args.json:
        print(as_json)
        return 0
    if not invoices:
        print(f"no invoices for {args.month}: no key was active or metered in it")
        return 0
    print(f"{'key':<10}{'name':<20}{'tier':<8}{'rows':>12}{'billable':>12}{'base':>10}{'usage':>10}{'total':>11}")
    for line in invoices:
        print(f"{line.key_id:<10}{line.name:<20}{line.tier:<8}{line.rows:>12}{line.billable_rows:>12}"
              f"{line.monthly_base:>10}{line.usage_charge:>10}{line.total:>11} {line.currency}")
    if args.out:
        print(f"invoices written to {args.out}/invoices-{args.month}.json, .csv, .html")
    return 0


def command_usage(args: argparse.Namespace) -> int:
    from maas.billing import billing_period
    from maas.service_store import connect_settled, usage_report

    if args.month:
        billing_period(args.month)  # 2026-13 is no month: one line, as maas bill says it
    report = usage_report(connect_settled(), args.month)
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    if not report:
        print(f"no requests metered{f' in {args.month}' if args.month else ''} yet")
        return 0
    print(f"{'month':<9}{'key':<10}{'name':<20}{'tier':<8}{'requests':>10}{'rows':>12}{'errors':>8}")
    for row in report:
        print(f"{row['month']:<9}{row['key_id']:<10}{row['name']:<20}{row['tier']:<8}"
              f"{row['requests']:>10}{row['rows']:>12}{row['errors']:>8}")
    return 0


def require_trained_store(what: str) -> None:
    """One line where no model was trained in this home yet, before MLflow makes an empty store
    there (with its INFO lines) only to say the model is not in it."""
    from maas.paths import is_embedded_store, maas_home

    if is_embedded_store() and not (maas_home() / "mlflow.db").is_file():
        raise MaasInputError(f"{what}: no MLflow store in {maas_home()} yet (train a model with `maas run`)")


def monitor_preflight(config) -> None:
    """Bad input (no such model, a missing labels file) as one line before any flow run starts."""
    import tempfile

    from maas.paths import maas_home
    from maas.tracking import mlflow_client
    from tasks.check import resolve_watched, watched_reference
    from tasks.prediction_log import read_ground_truth

    require_trained_store(f"monitoring.model '{watched_reference(config)}'")
    with tempfile.TemporaryDirectory(dir=maas_home(), prefix="preflight-") as scratch:
        resolve_watched(mlflow_client(), config, Path(scratch))
    if config.monitoring.labels_path:
        read_ground_truth(config.monitoring.labels_path)


def command_monitor(args: argparse.Namespace) -> int:
    def monitoring_flow(config):
        from flows.monitor import monitor

        return monitor

    return run_flow(args, monitor_preflight, monitoring_flow, "monitoring")


def command_schedule(args: argparse.Namespace) -> int:
    from maas.config import load_config

    config = load_config(args.config, args.dataset, args.target, args.overrides)
    from deployments.schedules import build_deployments, retrain_elsewhere

    deployments = build_deployments(config, args.config)
    note = retrain_elsewhere(config)
    if note:
        print(note)
    if args.pool:
        from maas.paths import project_root

        for deployment in deployments:
            # A process worker runs each flow run in a temporary folder unless told where the code is.
            deployment.job_variables = {**deployment.job_variables, "working_dir": str(project_root())}
            deployment.apply(work_pool_name=args.pool)
            print(f"registered {deployment.flow_name}/{deployment.name} for work pool '{args.pool}'")
        print(f"start a worker where this checkout is: prefect worker start --pool {args.pool}")
        return 0
    from prefect import serve

    with local_prefect_server() as api_url:
        for deployment in deployments:
            cron = ", ".join(schedule.schedule.cron for schedule in deployment.schedules)
            print(f"serving {deployment.flow_name}/{deployment.name} on cron '{cron}'", flush=True)
        print(f"Prefect API {api_url}; trigger a run with: PREFECT_API_URL={api_url} prefect deployment run "
              f"'{deployments[0].flow_name}/{deployments[0].name}'  (Ctrl-C to stop)", flush=True)
        try:
            serve(*deployments, print_starting_message=False)
        except KeyboardInterrupt:
            return 0
    return 0


@contextlib.contextmanager
def local_prefect_server():
    """The configured Prefect API, or one local server shared by the runner and its flow runs.

    Prefect's temporary server is per process: each flow run the runner starts would get its own,
    and a deployment's concurrency slot, leased on the runner's server, is then unknown where the
    run releases it (the run is cancelled). So the runner starts one and hands its URL down.
    """
    from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

    if get_current_settings().api.url:
        yield get_current_settings().api.url
        return
    import subprocess
    import types

    from prefect.server.api import server as server_module

    from maas.processes import in_own_group_dying_with_us

    server = server_module.SubprocessASGIServer()
    # Its own process group: a SIGTERM to ours (systemd stopping the service, `timeout`) killed the
    # server at once, and the runner, pausing its deployments through it, retried past 40 s and hung.
    # Stopped by us below, after the runner; killed by the kernel if we are.
    server_module.subprocess = types.SimpleNamespace(
        Popen=in_own_group_dying_with_us(subprocess.Popen), TimeoutExpired=subprocess.TimeoutExpired)
    try:
        server.start(timeout=int(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")))
    finally:
        server_module.subprocess = subprocess
    os.environ["PREFECT_API_URL"] = server.api_url
    try:
        with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
            yield server.api_url
    finally:
        os.environ.pop("PREFECT_API_URL", None)
        server.stop()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_defaults()
    # Only the commands that run one flow and end: `maas schedule`'s Prefect runner handles SIGTERM
    # itself, and with this handler its shutdown hung past 60 s on Ctrl-C.
    if args.command in ("run", "monitor"):
        handle_sigterm()
    handlers = {"run": command_run, "tune-worker": command_tune_worker, "ui": command_ui,
                "tracking-server": command_tracking_server, "serve": command_serve, "keys": command_keys, "promote": command_promote,
                "rollback": command_rollback, "audit": command_audit, "purge": command_purge, "bill": command_bill,
                "usage": command_usage, "monitor": command_monitor, "schedule": command_schedule}
    try:
        return handlers[args.command](args)
    except MaasInputError as error:
        print(f"maas: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt as stop:
        terminated = isinstance(stop, Terminated)
        print("maas: terminated" if terminated else "maas: interrupted", file=sys.stderr)
        return 143 if terminated else 130


if __name__ == "__main__":
    sys.exit(main())
