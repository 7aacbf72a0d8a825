"""The MLflow pyfunc as code (MLflow's "models from code"): logging copies this file into the model and
loading runs it; nothing is pickled. The model itself is ``service.mlflow_model.IntroPriorModel``."""

from mlflow.models import set_model

from service.mlflow_model import IntroPriorModel

set_model(IntroPriorModel())
