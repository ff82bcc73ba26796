"""maas: a dataset in, a tuned, evaluated model registered in MLflow and served out."""

__version__ = "0.1.0"
