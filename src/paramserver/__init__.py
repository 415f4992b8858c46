"""paramserver: a synchronous federated-learning parameter server on gRPC and PyTorch.

The public API: Task, TaskContext, serve, run_client, run_experiment,
History, read_history; data (digits, MNIST IDX, generated) and partition
(IID, Dirichlet, shards, quantity skew). The rest is internal.
"""

import importlib
import warnings
from typing import TYPE_CHECKING

# torch warns at import when numpy is absent; paramserver never uses numpy.
warnings.filterwarnings("ignore", message="Failed to initialize NumPy", category=UserWarning)

__version__ = "0.2.0"

# The public API (see README "Your own experiment"); everything else is
# internal. Loaded on first use (PEP 562), so that importing a pure module
# (paramserver.rounds, say) loads no grpc.
_PUBLIC = {
    "EvaluationRecord": "paramserver.api", "History": "paramserver.api",
    "RoundRecord": "paramserver.api", "Server": "paramserver.api",
    "read_history": "paramserver.api", "run_client": "paramserver.api",
    "run_experiment": "paramserver.api", "serve": "paramserver.api",
    "Result": "paramserver.task", "Task": "paramserver.task",
    "TaskContext": "paramserver.tasks",
    "data": "paramserver.data", "partition": "paramserver.partition",
}
__all__ = ["EvaluationRecord", "History", "Result", "RoundRecord", "Server", "Task",
           "TaskContext", "__version__", "data", "partition", "read_history", "run_client",
           "run_experiment", "serve"]

if TYPE_CHECKING:  # what the names are, for type checkers and editors
    from paramserver import data, partition
    from paramserver.api import (
        EvaluationRecord,
        History,
        RoundRecord,
        Server,
        read_history,
        run_client,
        run_experiment,
        serve,
    )
    from paramserver.task import Result, Task
    from paramserver.tasks import TaskContext


def __getattr__(name: str) -> object:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'paramserver' has no attribute {name!r}")
    loaded = importlib.import_module(module)
    return loaded if module.endswith("." + name) else getattr(loaded, name)
