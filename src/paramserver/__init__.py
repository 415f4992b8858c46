"""paramserver: a synchronous federated-learning parameter server on gRPC and PyTorch.

Modules, each importing only those above it:
errors, rounds (pure barrier), codec (wire format), averaging (pure), spool
(update files), training, server (gRPC transport), client, processes, cli.
"""

import warnings

# torch warns at import when numpy is absent; paramserver never uses numpy.
warnings.filterwarnings("ignore", message="Failed to initialize NumPy", category=UserWarning)

__version__ = "0.1.0"
