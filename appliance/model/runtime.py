"""The inference runtimes as the process meets them: imported with one sentence when they are broken, and numpy's
BLAS kept off the cores the engine holds."""

from __future__ import annotations

import importlib

from appliance.errors import EngineUnavailableError
from appliance.terms import EngineName


def load_runtime(engine: EngineName, module: str, name: str):
    """Import an inference runtime; a missing or broken install is one sentence, not a traceback."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        (other,) = set(EngineName) - {engine}
        raise EngineUnavailableError(f"{name} cannot be loaded on this machine ({exc}); reinstall the appliance "
                                     f"(`pip install -e .`) or choose the other engine (engine = \"{other}\")") from None


def one_blas_thread() -> None:
    """numpy's BLAS (the OOD distances' matrix product beside every batch) on one thread in a process that
    runs a model: on the bench PC's 2 cores its own threads only wait for the cores the engine holds
    (PERFORMANCE-NOTES trap 4); the measurement is in docs/performance.md, "Why the code is shaped so"."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(1, user_api="blas")
