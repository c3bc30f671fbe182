"""FLoRA on a real peft model: after a round, the merged model equals W0 + Σ p_k s_k B_k A_k."""

from __future__ import annotations

import copy

import torch

from fedft.adapters import peft_io
from fedft.aggregation import get_aggregator
from fedft.models import tiny_model
from fedft.training.coordinator import Coordinator
from fedft.training.local import train_steps
from fedft.training.runtime import adapted_shapes
from fedft.types import ClientUpdate


def test_flora_round_on_peft_model_matches_hand_merge():
    model, tok = tiny_model("classification", family="bert", seed=0)
    for p in model.parameters():
        p.requires_grad_(False)
    shapes = adapted_shapes(model, ["query", "value"])
    batch = tok(
        ["a fine film", "dull and long", "great acting", "boring"],
        padding=True,
        return_tensors="pt",
    )
    batch = {**batch, "labels": torch.tensor([1, 0, 1, 0])}
    batch.pop("token_type_ids", None)
    agg = get_aggregator("flora")
    ranks, alphas, sizes = [2, 4, 8], [4.0, 16.0, 8.0], [10, 30, 60]
    coord = Coordinator(
        aggregator=agg,
        shapes=shapes,
        rank_of=lambda i: ranks[i],
        alpha=16.0,
        extras={},
        seed=0,
        max_rank=8,
    )
    updates = []
    for k, (rank, alpha, n) in enumerate(zip(ranks, alphas, sizes)):
        pm = peft_io.attach_lora(
            model, target_modules=["query", "value"], rank=rank, alpha=alpha, seed=k
        )
        try:  # B = 0 at init: train a few steps so every client's B_k A_k is non-zero
            train_steps(pm, [batch] * 3, lr=0.05, device=torch.device("cpu"))
            factors = peft_io.get_factors(pm)
        finally:
            peft_io.detach_lora(pm)
        assert all(float(f.b.abs().sum()) > 0 for f in factors.values())
        updates.append(ClientUpdate(client_id=str(k), adapters=factors, num_examples=n))
    coord.aggregate(updates)

    # by hand: W0 + Σ p_k s_k B_k A_k, with p_k = n_k / Σ n and s_k = alpha_k / r_k
    by_hand = copy.deepcopy(model)
    modules = dict(by_hand.named_modules())
    total = sum(sizes)
    for name in shapes:
        w = modules[name].weight
        for u, n, rank, alpha in zip(updates, sizes, ranks, alphas):
            f = u.adapters[name]
            w.data += (n / total) * (alpha / rank) * (f.b @ f.a)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        want = by_hand(**inputs).logits
        with peft_io.base_delta_applied(model, coord.dense_base_delta()):
            got = model(**inputs).logits
        after = model(**inputs).logits  # restored exactly
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    assert not torch.allclose(got, after, atol=1e-4)  # the round changed the model
    # the stacked factors travel: rank of the folded delta is at most Σ r_k = 14
    assert all(f.rank <= 14 for f in coord.base_factors.values())
