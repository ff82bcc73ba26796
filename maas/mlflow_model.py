"""MLflow models-from-code entry: a maas bundle as a pyfunc model, with nothing pickled.

MLflow executes this file when loading the model. It needs only maas/bundle.py, which is
logged beside it (code_paths), and the bundle folder, logged as the artifact 'bundle'.
"""

import pandas as pd
from mlflow.models import set_model
from mlflow.pyfunc import PythonModel

try:
    from maas.bundle import ModelBundle
except ImportError:  # maas not installed: use the copy MLflow put on sys.path from code/
    from bundle import ModelBundle


class BundleModel(PythonModel):
    """Raw rows in (a DataFrame keyed by training column names), label + probabilities out."""

    def load_context(self, context):
        self.bundle = ModelBundle.load(context.artifacts["bundle"])

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        return self.bundle.predict(model_input)


set_model(BundleModel())
