"""Where maas keeps its state: everything under MAAS_HOME unless a team setting says otherwise."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_HOME = ".maas"


def maas_home() -> Path:
    """The state folder (MAAS_HOME, default ./.maas), created on first use, never at import."""
    home = Path(os.environ.get("MAAS_HOME", DEFAULT_HOME)).expanduser().resolve()
    home.mkdir(mode=0o700, parents=True, exist_ok=True)  # it holds the prediction log and key hashes: owner-only
    return home


def encoders_home() -> Path:
    """Exported text encoders (models/text_encoder.py): MAAS_ENCODERS, shared by several homes, or
    MAAS_HOME/encoders."""
    shared = os.environ.get("MAAS_ENCODERS")
    return Path(shared).expanduser().resolve() if shared else maas_home() / "encoders"


def is_embedded_store() -> bool:
    """True unless the user pointed MLflow at a tracking server (team mode)."""
    return not os.environ.get("MLFLOW_TRACKING_URI")


def tracking_uri() -> str:
    """MLflow tracking store: MLFLOW_TRACKING_URI for a team server, else SQLite in MAAS_HOME."""
    if is_embedded_store():
        return f"sqlite:///{maas_home() / 'mlflow.db'}"
    return os.environ["MLFLOW_TRACKING_URI"]


def artifact_root() -> Path:
    """Folder for the artifacts of experiments created on the embedded store."""
    return maas_home() / "mlartifacts"


def project_root() -> Path:
    """The source checkout (holds the lock file and the git history used by the manifest)."""
    return Path(__file__).resolve().parent.parent


def use_embedded_bentoml_home() -> None:
    """BentoML's model and Bento store under MAAS_HOME, unless BENTOML_HOME says otherwise.
    Call before the first `import bentoml`: it reads the variable once."""
    os.environ.setdefault("BENTOML_HOME", str(maas_home() / "bentoml"))
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
