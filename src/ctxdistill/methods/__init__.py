"""Training methods: one module per method, each holding its options (a config section), its data
preparation and its loss; the contract and the registry are in `base.py`.

Importing this package registers every method, in the order `ctxdistill train --help` lists them.
"""

from . import disc, ft, ft_kl, lora, rephrase, talr, replay, cd_base, icl_distill, mixsd, sdft  # noqa: F401  (registers them)
from .base import REGISTRY, LossOutput, Method, PrepareContext, PreparedCorpus, get_method, method_class, register

__all__ = ["REGISTRY", "LossOutput", "Method", "PrepareContext", "PreparedCorpus", "get_method", "method_class", "register"]
