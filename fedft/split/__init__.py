"""Split learning (U-shape).

Model partition, per-client body adapters, the transport-free step and SFPrompt (local loss
+ EL2N pruning).
"""

from fedft.split.body_adapter import BodyAdapter
from fedft.split.partition import (
    Blocks,
    SplitParts,
    back_parameter_names,
    model_family,
    split_model,
)
from fedft.split.sfprompt import el2n, keep_top_fraction, local_loss_phase, select_samples
from fedft.split.step import (
    BackOutput,
    BodyContext,
    FrontOutput,
    back_backward,
    back_forward,
    body_backward,
    body_forward,
    front_backward,
    front_forward,
    local_loss,
    split_train_step,
)

__all__ = [
    "BackOutput",
    "Blocks",
    "BodyAdapter",
    "BodyContext",
    "FrontOutput",
    "SplitParts",
    "back_backward",
    "back_forward",
    "back_parameter_names",
    "body_backward",
    "body_forward",
    "el2n",
    "front_backward",
    "front_forward",
    "keep_top_fraction",
    "local_loss",
    "local_loss_phase",
    "model_family",
    "select_samples",
    "split_model",
    "split_train_step",
]
