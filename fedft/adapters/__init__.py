"""LoRA math over plain tensors, and (in :mod:`fedft.adapters.peft_io`) peft state I/O.

Only the pure-tensor functions are imported here, so aggregation code can use them without
importing peft; model code imports :mod:`fedft.adapters.peft_io` explicitly.
"""

from fedft.adapters.math import (
    effective_delta,
    numerical_rank,
    pad_rank,
    svd_factors,
    truncate_rank,
)

__all__ = ["effective_delta", "numerical_rank", "pad_rank", "svd_factors", "truncate_rank"]
