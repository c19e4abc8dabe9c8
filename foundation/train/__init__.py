"""Training: `foundation-train` (cli.py), the LightningModule (module.py), losses, metrics,
EMA, strategies (DDP, DeepSpeed ZeRO incl. CPU), callbacks and checkpoint export."""

from foundation.train.checkpoint import (
    export_inference_checkpoint,
    load_inference_checkpoint,
    load_inference_model,
)

__all__ = ["export_inference_checkpoint", "load_inference_checkpoint", "load_inference_model"]
