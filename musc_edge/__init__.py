"""musc-edge: MuSc zero-shot industrial anomaly detection for the production line.

``musc_edge.core`` is the algorithm (MUSC_SPEC 2-6), numpy and the array API only;
``score_tokens`` is its entry point. The applications (``score``, ``watch``), the dataset
layouts, the writers and the CLI are subpackages built on it; ``runtime``, ``export`` and
``calibration`` live in their own top-level folders under this one namespace.
"""

__version__ = "0.1.0"

from .core.errors import MuscEdgeError  # noqa: E402
from .core.params import DEFAULT_PARAMS, MuscParams  # noqa: E402
from .core.types import Features, Scores  # noqa: E402


def __getattr__(name: str):
    # Lazy: importing the package (the CLI's --help, the runtime) should not load the scorer.
    if name in ("score_tokens", "upsample_map"):
        from .core import scorer

        return getattr(scorer, name)
    if name == "msm":
        from .core.msm import msm

        return msm
    raise AttributeError(f"module 'musc_edge' has no attribute {name!r}")


__all__ = ["__version__", "DEFAULT_PARAMS", "MuscEdgeError", "MuscParams", "Features", "Scores", "score_tokens",
           "msm", "upsample_map"]
