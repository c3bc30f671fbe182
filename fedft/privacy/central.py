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
at q = m / N, one step per round (the DP-FedAvg analysis; Flower's fixed-size client
sampling is treated as Poisson sampling, as that analysis does). ε reported here is
user-level: one unit is one client's whole data.
"""

from __future__ import annotations

import logging
import math
import secrets
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from fedft.aggregation.base import Aggregator, clone_factors
from fedft.privacy.accountant import (
    BudgetDecision,
    BudgetExceededError,
    Mechanism,
    PrivacyAccountant,
    check_budget,
)
from fedft.types import AggregationResult, ClientUpdate, LoraFactors

logger = logging.getLogger(__name__)

__all__ = ["CentralDP"]

_FIELDS: dict[str, tuple[str, ...]] = {"ab": ("a", "b"), "b": ("b",), "r": ("r",)}


class CentralDP(Aggregator):
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
    supports_mixed_ranks: ClassVar[bool] = False
    linear: ClassVar[bool] = True
    trainable: ClassVar[Literal["ab", "b", "r"]] = "ab"  # the inner's, set per instance

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
        super().__init__()
        if not getattr(inner, "linear", False) or inner.supports_mixed_ranks:
            raise ValueError(
                f"user-level DP adds noise to a sum of updates, so it needs a linear "
                f"aggregator of one rank (fedit, fedsb, ffa); {inner.name!r} is not one"
            )
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
        self.inner = inner
        # the interface's class attribute, per instance: what the inner aggregator trains
        vars(self)["trainable"] = inner.trainable
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
        self._ref: dict[str, LoraFactors] = {}
        self._ref_extras: dict[str, Tensor] = {}

    # -- delegation ---------------------------------------------------------------------
    def init_global(
        self,
        shapes: Mapping[str, tuple[int, int]],
        *,
        rank: int,
        scaling: float,
        generator: torch.Generator,
    ) -> dict[str, LoraFactors]:
        """The inner aggregator's round-1 adapters; they become the reference."""
        init = self.inner.init_global(shapes, rank=rank, scaling=scaling, generator=generator)
        self._shapes = dict(self.inner._shapes)
        self.set_reference(init, extras=self._ref_extras)
        return init

    def client_start(
        self,
        global_adapters: Mapping[str, LoraFactors],
        *,
        rank: int,
        scaling: float,
        generator: torch.Generator,
    ) -> dict[str, LoraFactors]:
        """The inner aggregator's client start."""
        return self.inner.client_start(
            global_adapters, rank=rank, scaling=scaling, generator=generator
        )

    def set_reference(
        self,
        global_adapters: Mapping[str, LoraFactors],
        *,
        extras: Mapping[str, Tensor] | None = None,
    ) -> None:
        """Set what every client starts this round from (after a round: the result).

        Args:
            global_adapters: module -> LoraFactors all clients started from.
            extras: dense trainables (head, prompts) all clients started from.
        """
        self._ref = {mod: clone_factors(f) for mod, f in global_adapters.items()}
        self._ref_extras = {k: v.detach().clone() for k, v in (extras or {}).items()}

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
    def _deltas(self, update: ClientUpdate) -> list[Tensor]:
        """Client's trainable tensors minus the reference, flattened in a fixed order."""
        if not self._ref:
            raise RuntimeError(
                "CentralDP needs the adapters clients started from: call init_global or "
                "set_reference(global_adapters, extras=...) before aggregate"
            )
        if set(update.adapters) != set(self._ref):
            raise ValueError(
                f"client {update.client_id!r} adapts {sorted(update.adapters)}, the reference "
                f"has {sorted(self._ref)}"
            )
        if set(update.extras) != set(self._ref_extras):
            raise ValueError(
                f"client {update.client_id!r} sends extras {sorted(update.extras)}; the "
                f"reference has {sorted(self._ref_extras)}: pass extras= to set_reference"
            )
        trained = _FIELDS[self.trainable]
        out: list[Tensor] = []
        for mod in sorted(self._ref):
            mine, ref = update.adapters[mod], self._ref[mod]
            if mine.scaling != ref.scaling:
                raise ValueError(f"client {update.client_id!r}: module {mod!r} scaling differs")
            for name in ("a", "b", "r"):
                x, x0 = getattr(mine, name), getattr(ref, name)
                if (x is None) != (x0 is None) or (x is not None and x.shape != x0.shape):
                    raise ValueError(
                        f"client {update.client_id!r}: module {mod!r} field {name!r} does not "
                        "match the reference's shape"
                    )
                if x is None or x0 is None:
                    continue
                if name in trained:
                    out.append((x.to(torch.float64) - x0.to(torch.float64)).flatten())
                elif not torch.equal(x.to(x0.dtype), x0):
                    raise ValueError(
                        f"client {update.client_id!r} changed the frozen {name!r} of module "
                        f"{mod!r}; {self.inner.name} trains only {trained}"
                    )
        for key in sorted(self._ref_extras):
            x, x0 = update.extras[key], self._ref_extras[key]
            if x.shape != x0.shape:
                raise ValueError(f"client {update.client_id!r}: extras {key!r} shape differs")
            out.append((x.to(torch.float64) - x0.to(torch.float64)).flatten())
        return out

    def _generator(self) -> torch.Generator:
        seed = secrets.randbits(63) if self.seed is None else self.seed * 1_000_003 + self._round
        return torch.Generator().manual_seed(seed % 2**63)

    def aggregate(self, updates: Sequence[ClientUpdate]) -> AggregationResult:
        """Clip each update, add noise once to the sum, divide by m, hand it to ``inner``.

        Raises:
            BudgetExceededError: the round would exceed ``epsilon_budget`` (nothing changes).
            ValueError: no updates, a client twice, or updates that do not match the
                reference.
        """
        if not updates:
            raise ValueError("central_dp: no client updates to aggregate")
        ids = [u.client_id for u in updates]
        if len(set(ids)) != len(ids):
            raise ValueError(f"central_dp: a client replies more than once: {sorted(ids)}")
        decision = self.budget_decision()
        if decision is not None and not decision.allowed:
            logger.warning("%s", decision.message)
            raise BudgetExceededError(decision)
        ordered = sorted(updates, key=lambda u: u.client_id)
        total: Tensor | None = None
        for u in ordered:
            delta = torch.cat(self._deltas(u))  # (D,) float64
            norm = float(delta.norm())
            factor = 1.0 if norm <= self.clip_norm else self.clip_norm / norm
            total = delta * factor if total is None else total + delta * factor
        assert total is not None
        if self.noise_multiplier > 0:
            std = self.noise_multiplier * self.clip_norm
            noise = torch.randn(total.shape, generator=self._generator(), dtype=torch.float64)
            total = total + std * noise  # (D,)
        mean = total / self.expected_clients  # fixed denominator m
        private = self._unflatten(mean)
        result = self.inner.aggregate([private])
        self._shapes = dict(self.inner._shapes)
        self.accountant.step(
            noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate, steps=1
        )
        self._round += 1
        self.set_reference(result.adapters, extras=result.extras)
        metrics = dict(result.metrics)
        metrics["clients"] = float(len(ordered))
        metrics["user_dp_noise_std"] = (
            self.noise_multiplier * self.clip_norm / self.expected_clients
        )
        if self.delta is not None:
            metrics["epsilon_user"] = self.accountant.epsilon(self.delta)
        return AggregationResult(
            adapters=result.adapters,
            base_delta=result.base_delta,
            metrics=metrics,
            extras=result.extras,
        )

    def _unflatten(self, mean: Tensor) -> ClientUpdate:
        """Return reference + mean (one flat vector) as a ClientUpdate in the reference's layout."""
        trained = _FIELDS[self.trainable]
        pos = 0

        def take(like: Tensor) -> Tensor:
            nonlocal pos
            piece = mean[pos : pos + like.numel()].view(like.shape)
            pos += like.numel()
            return (like.to(torch.float64) + piece).to(like.dtype)

        adapters: dict[str, LoraFactors] = {}
        for mod in sorted(self._ref):
            ref = self._ref[mod]
            new = {
                name: take(getattr(ref, name))
                if name in trained and getattr(ref, name) is not None
                else getattr(ref, name)
                for name in ("a", "b", "r")
            }
            adapters[mod] = LoraFactors(a=new["a"], b=new["b"], scaling=ref.scaling, r=new["r"])
        extras = {key: take(self._ref_extras[key]) for key in sorted(self._ref_extras)}
        if pos != mean.numel():
            raise AssertionError(f"unflatten used {pos} of {mean.numel()} values")
        return ClientUpdate(
            client_id="central_dp", adapters=adapters, num_examples=1, extras=extras
        )

    # -- checkpointing ------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Inner state, accountant, round counter and the reference (tensors)."""
        return {
            "name": self.name,
            "inner": self.inner.state_dict(),
            "accountant": self.accountant.state_dict(),
            "round": self._round,
            "reference": {
                mod: {"a": f.a.clone(), "b": f.b.clone(), "scaling": f.scaling, "r": f.r}
                for mod, f in self._ref.items()
            },
            "reference_extras": {k: v.clone() for k, v in self._ref_extras.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (the inner aggregator's too)."""
        if state.get("name") != self.name:
            raise ValueError(f"cannot load a {state.get('name')!r} state into central_dp")
        self.inner.load_state_dict(state["inner"])
        self._shapes = dict(self.inner._shapes)
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
