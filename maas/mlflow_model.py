"""MLflow models-from-code entry: a maas bundle as a pyfunc model, with nothing pickled.

MLflow executes this file when loading the model. It needs only maas/bundle.py, which is
logged beside it (code_paths), and the bundle folder, logged as the artifact 'bundle'.
"""

import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import set_model
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel

try:
    from maas.bundle import InputSchemaError, ModelBundle
except ImportError:  # maas not installed: use the copy MLflow put on sys.path from code/
    from bundle import InputSchemaError, ModelBundle


class RowsRefused(MlflowException, ValueError):
    """Rows the model cannot read (a missing column, a word in a numeric column), as an MlflowException
    so that `mlflow models serve` answers 400 with this message (any other exception is a 400 saying
    only "Encountered an unexpected error", the reason left in a stack trace); a ValueError still."""

    def __init__(self, message: str):
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)


class BundleModel(PythonModel):
    """Raw rows in (a DataFrame keyed by training column names), label + probabilities out; the label in
    the target column's type, as MLflow's scikit-learn flavor answers."""

    def load_context(self, context):
        self.bundle = ModelBundle.load(context.artifacts["bundle"])

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        try:
            return self.bundle.predict_typed(model_input)
        except InputSchemaError as refused:
            raise RowsRefused(str(refused)) from None


set_model(BundleModel())
