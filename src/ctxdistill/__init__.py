"""ctxdistill: keep a post-trained LLM's knowledge current without losing its skills.

Python API (the CLI is a thin shell over it):

    from ctxdistill import TrainConfig, train
    result = train(TrainConfig(method="disc", corpus="bundled:news_updates", out="runs/disc", lr=3e-5))
    cfg = TrainConfig.from_options({"method": "disc", "temperature": 1.0, "lr": 3e-5})  # method options by name
"""

__version__ = "0.1.0"

from .config import TrainConfig  # noqa: E402
from .errors import CtxDistillError  # noqa: E402


def train(cfg, **kwargs):
    """Train with `cfg` (see `ctxdistill.training.loop`); imported lazily to keep `import ctxdistill` light."""
    from .training import train as _train

    return _train(cfg, **kwargs)


__all__ = ["TrainConfig", "CtxDistillError", "train", "__version__"]
