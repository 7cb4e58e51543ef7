"""musc-edge: MuSc zero-shot industrial anomaly detection for the production line.

The core (this package) is pure numpy: ``score_tokens`` implements MUSC_SPEC sections 2-5.
"""

__version__ = "0.1.0"

from .errors import MuscEdgeError  # noqa: E402
from .types import Features, Scores  # noqa: E402


def __getattr__(name: str):
    # Lazy so that a half-built tree still imports; the scorer itself is pure numpy.
    if name in ("score_tokens", "msm", "upsample_map"):
        from . import scorer

        return getattr(scorer, name)
    raise AttributeError(f"module 'musc_edge' has no attribute {name!r}")


__all__ = ["__version__", "MuscEdgeError", "Features", "Scores", "score_tokens", "msm", "upsample_map"]
