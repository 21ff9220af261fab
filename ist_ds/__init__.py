"""ist_ds: Importance-aware Sparse Tuning for PEFT on DeepSpeed ZeRO and PyTorch FSDP2."""

from ist_ds.core import ISTConfig, ImportanceState
from ist_ds.core.errors import (ISTAgreementError, ISTCheckpointError, ISTConfigError, ISTDataError, ISTError,
                                ISTLaunchError, ISTModelError)

__version__ = "0.1.0"


def initialize(*args, **kwargs):
    """IST-aware drop-in for ``deepspeed.initialize``; see :func:`ist_ds.backends.deepspeed.initialize`."""
    from ist_ds.backends.deepspeed import initialize as _initialize

    return _initialize(*args, **kwargs)


__all__ = [
    "ISTConfig", "ImportanceState", "initialize", "ISTError", "ISTConfigError", "ISTModelError",
    "ISTDataError", "ISTCheckpointError", "ISTLaunchError", "ISTAgreementError", "__version__",
]
