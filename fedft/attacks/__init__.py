"""Attacks a curious server can run on what fedft sends it, as measurements.

* :mod:`fedft.attacks.cut_inversion`: token ids back from the split cut's activations.
* :mod:`fedft.attacks.gradient_inversion`: the label (iDLG) and the tokens (DLG) of one
  client's batch-of-one update.
* :mod:`fedft.attacks.audit`: the attacks that apply to one run's configuration, on its own
  model, data and defences (``fedft simulate --audit``).

Pure library code (tensors in, numbers out): ``simulations/attacks.py`` runs them on fedft's
own payloads and ``tests/test_attacks.py`` holds each attack's sanity case.
"""

from fedft.attacks.cut_inversion import (
    RidgeInverter,
    cut_front,
    depth0_candidates,
    nearest_embedding_invert,
    recovery_rate,
)
from fedft.attacks.gradient_inversion import (
    InversionResult,
    gradient_distance,
    infer_label,
    invert_gradient,
    random_guess_f1,
    released_update_label,
    token_f1,
    update_gradients,
)

__all__ = [
    "InversionResult",
    "RidgeInverter",
    "cut_front",
    "depth0_candidates",
    "gradient_distance",
    "infer_label",
    "invert_gradient",
    "nearest_embedding_invert",
    "random_guess_f1",
    "recovery_rate",
    "released_update_label",
    "token_f1",
    "update_gradients",
]
