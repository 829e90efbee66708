"""FT+LoRA (DiSC paper baseline): next-token CE over each document, training only a LoRA adapter.

Defaults as in the authors' code: r 16, α 32, dropout 0.1, all linear layers (`lora_*` options).
The authors' example learning rate is 5e-5.
"""

from __future__ import annotations

from ..errors import CtxDistillError
from .ft import FineTune


class LoraFineTune(FineTune):
    name = "lora"
    default_student = "lora"

    def configure(self, cfg):
        if cfg.student == "full":
            raise CtxDistillError("method lora trains a LoRA adapter; drop --student full, or use --method ft for full fine-tuning")
        return super().configure(cfg)
