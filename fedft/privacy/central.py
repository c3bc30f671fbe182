"""User-level (client-level) DP as a wrapper around a linear aggregator.

DP-FedAvg (McMahan et al., 2018, "Learning Differentially Private Recurrent Language
Models", Algorithm 1 with the fixed-denominator estimator f̃_f) made to compose like
TensorFlow Federated's DP aggregator factories: ``CentralDP(inner=FedIT())``. Each round:

1. Δ_k = (client k's trainable tensors) − (the reference all clients started from), over
   every adapted module and every dense extra (head, prompts) together, as one vector;
2. Δ̂_k = Δ_k · min(1, C / ‖Δ_k‖₂)  (the whole update clipped to norm C);
3. S = Σ_k Δ̂_k + N(0, σ²C² I), the noise drawn once for the sum;
4. new = reference + S / m, with m the *expected* number of clients per round (a fixed,
   public denominator: one client changes S/m by at most C/m whatever the others did;
   dividing by the realised count would make the denominator data-dependent);
5. ``inner.aggregate`` receives this one privatised update, so a linear aggregator returns it
   unchanged (the one-client identity) and keeps its own bookkeeping (FFA's shared A, ...).

Weights are uniform (1/m), not p_k = n_k / Σ n: with p_k one client with many examples
would weigh more than 1/m, its influence would no longer be bounded by C/m, and n_k itself
is private information. The round is accounted as a Poisson-subsampled Gaussian mechanism
at q = m / N, one step per round (the DP-FedAvg analysis). The server draws each round's
cohort as that analysis assumes (:func:`fedft.privacy.sampling.poisson_cohort`: every client
independently with probability q, from the OS's randomness, published nowhere), and an empty
cohort is a round too (the noise alone is released and accounted). ε reported here is
user-level: one unit is one client's whole data.
"""

from __future__ import annotations

import logging
import math
import secrets
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from fedft.aggregation.base import Aggregator
from fedft.aggregation.flat import clip_l2, flatten_trainables, unflatten_trainables
from fedft.aggregation.wrapper import MissingReferenceError, Wrapper
from fedft.privacy.accountant import (
    BudgetDecision,
    BudgetExceededError,
    Mechanism,
    PrivacyAccountant,
    check_budget,
)
from fedft.seeds import derive_seed
from fedft.types import PARTS_FIELDS, AggregationResult, ClientUpdate, LoraFactors, Parts

logger = logging.getLogger(__name__)

__all__ = ["CentralDP", "privatise_sum"]


class CentralDP(Wrapper):
    """User-level DP around a linear aggregator (fedit, fedsb, ffa).

    Args:
        inner: the linear aggregator (``inner.linear`` must be True).
        clip_norm: C, the L2 bound on each client's whole update (> 0; ``inf`` only with
            noise 0, for tests).
        noise_multiplier: σ; the noise on the sum has std σ·C per coordinate.
        expected_clients: m, the clients sampled per round (the fixed denominator).
        num_clients: N, all clients (the sampling rate is q = m / N).
        seed: seeds the noise (reproducible simulations). None draws fresh OS entropy every
            round: use None in deployment, since anyone who knows the seed can remove the
            noise.
        accountant: the mechanism of the user-level accountant this wrapper owns.
        epsilon_budget: when set (with ``delta``), a round that would exceed it is refused
            with :class:`BudgetExceededError` and nothing changes.
        delta: δ for the reported ``epsilon_user`` metric and the budget.
    """

    name: ClassVar[str] = "central_dp"
    linear: ClassVar[bool] = True

    def __init__(
        self,
        inner: Aggregator,
        *,
        clip_norm: float,
        noise_multiplier: float,
        expected_clients: int,
        num_clients: int,
        seed: int | None,
        accountant: Mechanism = "prv",
        epsilon_budget: float | None = None,
        delta: float | None = None,
    ) -> None:
        super().__init__(inner)  # user-level DP adds noise to a sum: inner must be linear
        if not clip_norm > 0 or noise_multiplier < 0:
            raise ValueError(
                f"clip_norm = {clip_norm} must be > 0 and noise_multiplier = "
                f"{noise_multiplier} >= 0"
            )
        if math.isinf(clip_norm) and noise_multiplier > 0:
            raise ValueError("an infinite clip_norm bounds nothing: noise std sigma*C is inf")
        if not 1 <= expected_clients <= num_clients:
            raise ValueError(
                f"expected_clients = {expected_clients} must be in 1..num_clients ({num_clients})"
            )
        if epsilon_budget is not None and delta is None:
            raise ValueError("epsilon_budget needs delta")
        self.clip_norm = float(clip_norm)
        self.noise_multiplier = float(noise_multiplier)
        self.expected_clients = int(expected_clients)
        self.num_clients = int(num_clients)
        self.sample_rate = expected_clients / num_clients
        self.seed = seed
        self.epsilon_budget = epsilon_budget
        self.delta = delta
        self.accountant = PrivacyAccountant(accountant, level="user")
        self._round = 0

    # -- privacy ------------------------------------------------------------------------
    def epsilon(self, delta: float) -> float:
        """User-level ε at ``delta`` spent over all rounds aggregated so far."""
        return self.accountant.epsilon(delta)

    def budget_decision(self) -> BudgetDecision | None:
        """Whether one more round fits ``epsilon_budget`` (None without a budget)."""
        if self.epsilon_budget is None or self.delta is None:
            return None
        return check_budget(
            self.accountant,
            noise_multiplier=self.noise_multiplier,
            sample_rate=self.sample_rate,
            steps=1,
            epsilon_budget=self.epsilon_budget,
            delta=self.delta,
        )

    # -- the round ----------------------------------------------------------------------
    def init_global(
        self,
        shapes: Mapping[str, tuple[int, int]],
        *,
        rank: int,
        scaling: float,
        generator: torch.Generator,
    ) -> dict[str, LoraFactors]:
        """The inner aggregator's round-1 adapters; they become the reference."""
        init = super().init_global(shapes, rank=rank, scaling=scaling, generator=generator)
        self.set_reference(init, extras=self._ref_extras)
        return init

    def _delta(self, update: ClientUpdate) -> Tensor:
        """(D,) float64: the client's trainable tensors minus the reference (flat layout)."""
        ref = self.reference_update()
        if not ref.adapters:
            raise MissingReferenceError(
                "CentralDP needs the adapters clients started from: call init_global or "
                "set_reference(global_adapters, extras=...) before aggregate"
            )
        _check_against_reference(update, ref, trainable=self.trainable, inner=self.inner.name)
        return flatten_trainables(update, self.trainable) - flatten_trainables(ref, self.trainable)

    def _seed(self) -> int | None:
        return None if self.seed is None else derive_seed(self.seed, self._round)

    def aggregate(self, updates: Sequence[ClientUpdate]) -> AggregationResult:
        """Clip each update, add noise once to the sum, divide by m, hand it to ``inner``.

        Raises:
            BudgetExceededError: the round would exceed ``epsilon_budget`` (nothing changes).
            ValueError: a client twice, or updates that do not match the reference. No
                updates (an empty cohort) is a round too: the noise alone is released.
        """
        ids = [u.client_id for u in updates]
        if len(set(ids)) != len(ids):
            raise ValueError(f"central_dp: a client replies more than once: {sorted(ids)}")
        decision = self.budget_decision()
        if decision is not None and not decision.allowed:
            logger.warning("%s", decision.message)
            raise BudgetExceededError(decision)
        # an empty cohort (Poisson sampling) is a round too: the noise alone is released
        ref = self.reference_update()
        total = torch.zeros_like(flatten_trainables(ref, self.trainable), dtype=torch.float64)
        for u in sorted(updates, key=lambda u: u.client_id):
            clipped, _ = clip_l2(self._delta(u), self.clip_norm)  # (D,) float64
            total = total + clipped
        return self.release(total, clients=len(updates))

    def release(self, clipped_sum: Tensor, *, clients: int) -> AggregationResult:
        """Steps 3-5 on the sum of the clients' clipped deltas: noise, / m, inner, account.

        The one place the round's privatised result is made, whether the server summed the
        clipped deltas itself (:meth:`aggregate`) or received only their sum (secure
        aggregation, where each client clipped its own delta before masking).

        Args:
            clipped_sum: (D,) float64, Σ_k Δ̂_k in the flat layout of the reference.
            clients: how many clients are in the sum (reported, never the denominator).
        """
        ref = self.reference_update()
        mean = privatise_sum(
            clipped_sum,
            noise_multiplier=self.noise_multiplier,
            clip_norm=self.clip_norm,
            denominator=self.expected_clients,
            seed=self._seed(),
        )
        private = unflatten_trainables(
            flatten_trainables(ref, self.trainable) + mean,
            ref,
            self.trainable,
            client_id="central_dp",
            num_examples=1,
        )
        result = self.inner.aggregate([private])
        self._shapes = dict(self.inner._shapes)
        self.accountant.step(
            noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate, steps=1
        )
        self._round += 1
        self.set_reference(result.adapters, extras=result.extras)
        metrics = {
            **result.metrics,
            "clients": float(clients),
            "user_dp_noise_std": self.noise_multiplier * self.clip_norm / self.expected_clients,
        }
        if self.delta is not None:
            metrics["epsilon_user"] = self.accountant.epsilon(self.delta)
        return AggregationResult(
            adapters=result.adapters,
            base_delta=result.base_delta,
            metrics=metrics,
            extras=result.extras,
        )

    # -- checkpointing ------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Inner state, accountant, round counter and the reference (tensors)."""
        ref = self._ref or {}
        return {
            **super().state_dict(),
            "accountant": self.accountant.state_dict(),
            "round": self._round,
            "reference": {
                mod: {"a": f.a.clone(), "b": f.b.clone(), "scaling": f.scaling, "r": f.r}
                for mod, f in ref.items()
            },
            "reference_extras": {k: v.clone() for k, v in self._ref_extras.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (the inner aggregator's too)."""
        super().load_state_dict(state)
        self.accountant.load_state_dict(state["accountant"])
        self._round = int(state["round"])
        self._ref = {
            str(mod): LoraFactors(
                a=torch.as_tensor(f["a"]).clone(),
                b=torch.as_tensor(f["b"]).clone(),
                scaling=float(f["scaling"]),
                r=None if f["r"] is None else torch.as_tensor(f["r"]).clone(),
            )
            for mod, f in state["reference"].items()
        }
        self._ref_extras = {
            str(k): torch.as_tensor(v).clone() for k, v in state["reference_extras"].items()
        }


def privatise_sum(
    clipped_sum: Tensor,
    *,
    noise_multiplier: float,
    clip_norm: float,
    denominator: int,
    seed: int | None,
) -> Tensor:
    """DP-FedAvg's release of a sum of clipped deltas: (Σ_k Δ̂_k + N(0, σ²C² I)) / m.

    Args:
        clipped_sum: (D,) float64, the sum of deltas each clipped to ``clip_norm``.
        noise_multiplier: σ (0: no noise, for tests).
        clip_norm: C; the noise std is σ·C per coordinate.
        denominator: m, the fixed, public expected number of clients per round.
        seed: seeds the noise (simulations); None draws fresh OS entropy (deployment: a
            known seed would let anyone remove the noise).

    Returns:
        (D,) float64, the privatised mean delta.
    """
    total = clipped_sum
    if noise_multiplier > 0:
        gen = torch.Generator().manual_seed(secrets.randbits(63) if seed is None else seed)
        noise = torch.randn(total.shape, generator=gen, dtype=torch.float64)
        total = total + noise_multiplier * clip_norm * noise  # (D,)
    return total / denominator


def _check_against_reference(
    update: ClientUpdate, ref: ClientUpdate, *, trainable: Parts, inner: str
) -> None:
    """Raise ValueError unless ``update`` matches the reference where it must.

    The same modules, extras, shapes and scalings, and the frozen factors left exactly as
    they were.
    """
    cid = update.client_id
    if set(update.adapters) != set(ref.adapters):
        raise ValueError(
            f"client {cid!r} adapts {sorted(update.adapters)}, the reference "
            f"has {sorted(ref.adapters)}"
        )
    if set(update.extras) != set(ref.extras):
        raise ValueError(
            f"client {cid!r} sends extras {sorted(update.extras)}; the "
            f"reference has {sorted(ref.extras)}: pass extras= to set_reference"
        )
    trained = PARTS_FIELDS[trainable]
    for mod in sorted(ref.adapters):
        mine, theirs = update.adapters[mod], ref.adapters[mod]
        if mine.scaling != theirs.scaling:
            raise ValueError(f"client {cid!r}: module {mod!r} scaling differs")
        for name in ("a", "b", "r"):
            x, x0 = getattr(mine, name), getattr(theirs, name)
            if (x is None) != (x0 is None) or (x is not None and x.shape != x0.shape):
                raise ValueError(
                    f"client {cid!r}: module {mod!r} field {name!r} does not "
                    "match the reference's shape"
                )
            if x is not None and name not in trained and not torch.equal(x.to(x0.dtype), x0):
                raise ValueError(
                    f"client {cid!r} changed the frozen {name!r} of module "
                    f"{mod!r}; {inner} trains only {trained}"
                )
    for key in sorted(ref.extras):
        if update.extras[key].shape != ref.extras[key].shape:
            raise ValueError(f"client {cid!r}: extras {key!r} shape differs")
