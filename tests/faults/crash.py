"""`maas` with a SIGKILL at a chosen moment: `python tests/faults/crash.py POINT maas-arguments...`.

The kill is the process's own, at an exact spot, so each fault test hits its moment every time:
  tuning        the second trial, after its second epoch (the first trial has finished)
  training      the final training, after its first epoch
  registration  between creating the model version and pointing the alias at it
  monitoring    a monitor check's end, after its MLflow run is written, before its state is saved
"""

from __future__ import annotations

import os
import signal
import sys


def die(*_args, **_kwargs):
    os.kill(os.getpid(), signal.SIGKILL)


def kill_in_epoch(module, call: int, epoch: int) -> None:
    """Wrap module.train_on_data: in its `call`-th call, die at the end of epoch `epoch`."""
    original, calls = module.train_on_data, []

    def train_on_data(prepared, settings, seed, on_epoch=None):
        calls.append(1)

        def report(record):
            if on_epoch is not None:
                on_epoch(record)
            if len(calls) == call and record.epoch == epoch:
                die()

        return original(prepared, settings, seed, report)

    module.train_on_data = train_on_data


def main() -> int:
    point, arguments = sys.argv[1], sys.argv[2:]
    if point == "tuning":
        import tasks.tune

        kill_in_epoch(tasks.tune, call=2, epoch=2)
    elif point == "training":
        import tasks.train
        import tasks.tune  # binds the unwrapped train_on_data first: trials are not the training stage

        kill_in_epoch(tasks.train, call=1, epoch=1)
    elif point == "registration":
        from mlflow import MlflowClient

        MlflowClient.set_registered_model_alias = die
    elif point == "monitoring":
        import tasks.check

        tasks.check.save_check = die
    else:
        raise SystemExit(f"unknown point {point!r}")
    from maas.cli import main as maas

    return maas(arguments)


if __name__ == "__main__":
    sys.exit(main())
