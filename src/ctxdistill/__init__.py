"""ctxdistill: keep a post-trained LLM's knowledge current without losing its skills.

Python API (the CLI is a thin shell over it):

    from ctxdistill import TrainConfig, train
    result = train(TrainConfig(method="disc", corpus="bundled:news_updates", out="runs/disc", lr=3e-5))
"""

__version__ = "0.1.0"

from .config import TrainConfig  # noqa: E402
from .errors import CtxDistillError  # noqa: E402


def train(cfg, **kwargs):
    """Train with `cfg` (see `ctxdistill.train.train`); imported lazily to keep `import ctxdistill` light."""
    from .train import train as _train

    return _train(cfg, **kwargs)


__all__ = ["TrainConfig", "CtxDistillError", "train", "__version__"]
