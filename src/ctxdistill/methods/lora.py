"""FT+LoRA (DiSC paper baseline): next-token CE over each document, training only a LoRA adapter.

Defaults as in the authors' code: r 16, α 32, dropout 0.1, all linear layers (the shared `lora_*`
options). The authors' example learning rate is 5e-5.
"""

from __future__ import annotations

from ..errors import CtxDistillError
from .base import register
from .ft import FineTune


@register
class LoraFineTune(FineTune):
    name = "lora"
    default_student = "lora"

    @classmethod
    def check(cls, cfg) -> None:
        if cfg.student == "full":
            raise CtxDistillError("method lora trains a LoRA adapter; drop --student full, or use --method ft for full fine-tuning")
