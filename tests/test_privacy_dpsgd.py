"""Sample-level DP-SGD: per-example clipping, noise scale, accounting, budgets, cleanup."""

from __future__ import annotations

import copy
import logging
import math

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

from fedft.data.encode import Encoded
from fedft.privacy import (
    BudgetExceededError,
    PerformanceFlags,
    PrivacyAccountant,
    check_budget,
    epsilon_of,
    per_sample_loss,
    train_private,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def tiny_lora_bert(seed: int = 0):
    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
        num_labels=2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    model = BertForSequenceClassification(cfg)
    lora = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["query", "value"],
        task_type="SEQ_CLS",
        lora_dropout=0.0,
        init_lora_weights=False,  # B != 0, so A gets gradients too
    )
    return get_peft_model(model, lora)


def toy_data(n: int = 8, t: int = 10, seed: int = 1) -> Encoded:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 64, (n, t), generator=g)
    mask = torch.ones(n, t, dtype=torch.long)
    mask[::2, t - 3 :] = 0  # some padding
    return Encoded(
        input_ids=ids, attention_mask=mask, labels=torch.randint(0, 2, (n,), generator=g)
    )


def trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def frozen(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}


def flat(d: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([d[k].flatten().cpu() for k in sorted(d)])


def per_example_grads(model, data: Encoded) -> list[torch.Tensor]:
    """Each example's gradient over the trainable parameters, by plain autograd one example
    at a time (no Opacus)."""
    m = copy.deepcopy(model).train()
    params = {n: p for n, p in m.named_parameters() if p.requires_grad}
    grads = []
    for i in range(len(data)):
        ex = data.subset([i])
        m.zero_grad(set_to_none=True)
        logits = m(input_ids=ex.input_ids, attention_mask=ex.attention_mask).logits
        per_sample_loss(logits, ex.labels).mean().backward()
        grads.append(torch.cat([params[k].grad.flatten() for k in sorted(params)]))
    return grads


def test_noise_free_step_equals_per_example_clipped_mean():
    """σ = 0, q = 1: Δθ = -lr · mean_i clip_C(g_i) exactly, frozen weights untouched."""
    model, data = tiny_lora_bert(), toy_data()
    grads = per_example_grads(model, data)
    norms = [float(g.norm()) for g in grads]
    clip = sorted(norms)[len(norms) // 2]  # some examples clipped, some not
    n_clipped = sum(n > clip for n in norms)
    assert 0 < n_clipped < len(data)
    expected = sum(g * min(1.0, clip / (n + 1e-6)) for g, n in zip(grads, norms)) / len(data)
    unclipped = sum(grads) / len(data)
    before_t, before_f = trainable(model), frozen(model)
    lr = 0.5
    metrics = train_private(
        model,
        data,
        steps=1,
        batch_size=len(data),
        lr=lr,
        noise_multiplier=0.0,
        max_grad_norm=clip,
        accountant=PrivacyAccountant("rdp"),
        seed=0,
        performance=PerformanceFlags(physical_batch_size=3),
    )
    step = (flat(trainable(model)) - flat(before_t)) / -lr
    torch.testing.assert_close(step, expected, rtol=1e-4, atol=1e-6)
    # the clipped mean is bounded by C, and clipping really changed the step
    assert float(step.norm()) <= clip + 1e-6
    assert not torch.allclose(step, unclipped, rtol=1e-3, atol=1e-6)
    for name, w in frozen(model).items():
        assert torch.equal(w, before_f[name]), name
    assert metrics["clip_fraction"] == pytest.approx(n_clipped / len(data))
    assert metrics["mean_batch_size"] == len(data) and metrics["steps"] == 1.0


def test_all_clipped_step_has_norm_at_most_clip(caplog):
    model, data = tiny_lora_bert(), toy_data()
    before = flat(trainable(model))
    clip = 1e-4  # far below every per-example gradient norm
    metrics = train_private(
        model, data, steps=1, batch_size=len(data), lr=1.0, noise_multiplier=0.0,
        max_grad_norm=clip, accountant=PrivacyAccountant("rdp"), seed=0,
    )  # fmt: skip
    step = before - flat(trainable(model))
    assert 0.1 * clip < float(step.norm()) <= clip * (1 + 1e-4)
    # every example's own gradient norm (not the batch's, not one parameter's) exceeded C
    assert metrics["clip_fraction"] == 1.0 and metrics["mean_batch_size"] == len(data)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fedft.privacy.dpsgd"):
        huge = train_private(
            model, data, steps=1, batch_size=len(data), lr=1.0, noise_multiplier=0.0,
            max_grad_norm=1e6, accountant=PrivacyAccountant("rdp"), seed=0,
        )  # fmt: skip
    assert huge["clip_fraction"] == 0.0
    # σ = 0 trains, and says that it is not private
    assert [r.getMessage() for r in caplog.records] == [
        "noise_multiplier = 0: clipped but not private (epsilon = inf)"
    ]


@pytest.mark.parametrize("device", DEVICES)
def test_noise_std_is_sigma_c_over_b(device):
    """Zero gradients: Δθ/lr is pure noise with std σ·C/B per coordinate."""
    model, data = tiny_lora_bert(), toy_data(n=16)
    sigma, clip, batch, lr = 2.0, 0.5, 4, 1.0
    before = flat(trainable(model))

    def zero_loss(logits, labels):
        return logits.sum(dim=-1) * 0.0

    train_private(
        model, data, steps=1, batch_size=batch, lr=lr, noise_multiplier=sigma,
        max_grad_norm=clip, accountant=PrivacyAccountant("rdp"), seed=3, device=device,
        loss_fn=zero_loss,
    )  # fmt: skip
    noise = (flat(trainable(model)) - before) / -lr
    assert noise.numel() > 1000
    expected = sigma * clip / batch
    std = float(noise.std())
    assert abs(std / expected - 1) < 0.08, (std, expected)
    assert abs(std / (1.3 * expected) - 1) > 0.15  # a 30% wrong sigma would fail
    assert abs(float(noise.mean())) < 4 * expected / noise.numel() ** 0.5


def test_same_seed_same_result_whatever_the_physical_batch():
    results = []
    for physical in (0, 1):
        model = tiny_lora_bert()
        train_private(
            model, toy_data(), steps=2, batch_size=4, lr=0.1, noise_multiplier=1.0,
            max_grad_norm=1.0, accountant=PrivacyAccountant("rdp"), seed=11,
            performance=PerformanceFlags(physical_batch_size=physical),
        )  # fmt: skip
        results.append(flat(trainable(model)))
    torch.testing.assert_close(results[0], results[1], rtol=1e-5, atol=1e-6)


def test_batches_and_noise_come_from_the_seed_alone():
    """Reproducible from ``seed`` whatever torch's global RNG holds; another seed, other noise."""
    data = toy_data(n=16)

    def run(seed: int, global_seed: int, batch_size: int) -> torch.Tensor:
        model = tiny_lora_bert()
        torch.manual_seed(global_seed)  # other work between rounds moves the global RNG
        train_private(
            model, data, steps=2, batch_size=batch_size, lr=0.5, noise_multiplier=1.0,
            max_grad_norm=1.0, accountant=PrivacyAccountant("rdp"), seed=seed,
        )  # fmt: skip
        return flat(trainable(model))

    assert torch.equal(run(5, 100, 4), run(5, 200, 4))
    # q = 1: every step takes every example, so only the noise can tell the seeds apart
    assert not torch.allclose(run(5, 0, 16), run(6, 0, 16))


def _mean_loss(model: torch.nn.Module, data: Encoded) -> float:
    """The mean per-example loss of ``model`` on all of ``data``, without gradients."""
    with torch.no_grad():
        logits = model(input_ids=data.input_ids, attention_mask=data.attention_mask).logits
    return float(per_sample_loss(logits, data.labels).mean())


def test_adamw_takes_its_own_first_step_and_train_loss_is_the_batches_mean_loss():
    """optimizer="adamw" at lr: Adam's first step moves every trained coordinate by ≈ lr."""
    data = toy_data()
    model = tiny_lora_bert()
    loss_before = _mean_loss(model, data)
    before = flat(trainable(model))
    lr = 1e-2
    metrics = train_private(
        model, data, steps=1, batch_size=len(data), lr=lr, noise_multiplier=0.0,
        max_grad_norm=1.0, accountant=PrivacyAccountant("rdp"), seed=0, optimizer="adamw",
    )  # fmt: skip
    # q = 1: the step's batch is every example, and its loss is measured before the update
    assert metrics["train_loss"] == pytest.approx(loss_before, rel=1e-5)
    moved = (flat(trainable(model)) - before).abs()
    moved = moved[moved > 0]
    # -lr·sign(g) - lr·0.01·θ (AdamW's decoupled weight decay): |Δ| within 2 % of lr
    assert len(moved) > 0.9 * len(before)
    assert float(moved.median()) == pytest.approx(lr, rel=0.02)


def test_physical_batches_bound_each_forward_and_the_metrics_cover_the_logical_batch():
    """physical_batch_size bounds memory (the examples in one pass), never what is reported."""
    data = toy_data()
    model = tiny_lora_bert()
    loss_before = _mean_loss(model, data)
    seen: list[int] = []
    model.register_forward_pre_hook(
        lambda _m, _args, kwargs: seen.append(len(kwargs["input_ids"])), with_kwargs=True
    )
    metrics = train_private(
        model, data, steps=2, batch_size=len(data), lr=1e-9, noise_multiplier=0.0,
        max_grad_norm=1.0, accountant=PrivacyAccountant("rdp"), seed=0,
        performance=PerformanceFlags(physical_batch_size=3),
    )  # fmt: skip
    assert seen == [3, 3, 2, 3, 3, 2]
    assert metrics["steps"] == 2.0 and metrics["mean_batch_size"] == len(data)
    # lr ≈ 0: both steps see the same model, so the mean loss is the one measured before
    assert metrics["train_loss"] == pytest.approx(loss_before, rel=1e-5)


def test_a_trainable_layer_with_buffers_is_refused():
    """BatchNorm's running statistics are computed from the data outside the mechanism."""
    from types import SimpleNamespace

    class BatchNormClassifier(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = torch.nn.Embedding(64, 4)
            self.norm = torch.nn.BatchNorm1d(4)
            self.out = torch.nn.Linear(4, 2)

        def forward(self, input_ids, attention_mask):
            return SimpleNamespace(logits=self.out(self.norm(self.emb(input_ids).mean(1))))

    model = BatchNormClassifier()
    with pytest.raises(NotImplementedError, match="trainable layer with buffers"):
        train_private(
            model, toy_data(), steps=1, batch_size=4, lr=0.1, noise_multiplier=1.0,
            max_grad_norm=1.0, accountant=PrivacyAccountant("rdp"), seed=0,
        )  # fmt: skip


def test_accountant_records_q_of_the_logical_batch_whatever_the_physical_batch():
    """q = B / n, never (physical batch) / n: memory settings must not change epsilon."""
    data = toy_data(n=12)
    histories, epsilons, rates = [], [], []
    for physical in (0, 1, 5, 20):
        acc = PrivacyAccountant("rdp")
        m = train_private(
            tiny_lora_bert(), data, steps=2, batch_size=6, lr=0.1, noise_multiplier=1.2,
            max_grad_norm=1.0, accountant=acc, seed=5, delta=1e-5,
            performance=PerformanceFlags(physical_batch_size=physical),
        )  # fmt: skip
        histories.append(acc.history)
        epsilons.append(m["epsilon_sample"])
        rates.append(m["sample_rate"])
    assert histories == [[(1.2, 6 / 12, 2)]] * 4
    assert rates == [0.5] * 4
    assert len(set(epsilons)) == 1
    assert epsilons[0] == epsilon_of([(1.2, 0.5, 2)], delta=1e-5, mechanism="rdp")


def test_accountant_records_exactly_the_steps_taken_across_rounds():
    model, data = tiny_lora_bert(), toy_data()
    acc = PrivacyAccountant("rdp")
    q = 2 / len(data)
    eps = []
    for _ in range(3):
        m = train_private(
            model, data, steps=2, batch_size=2, lr=0.1, noise_multiplier=1.1,
            max_grad_norm=1.0, accountant=acc, seed=None, delta=1e-5,
        )  # fmt: skip
        eps.append(m["epsilon_sample"])
    assert acc.history == [(1.1, q, 6)]
    assert eps == sorted(eps) and eps[0] < eps[-1]
    assert eps[-1] == pytest.approx(
        epsilon_of([(1.1, q, 6)], delta=1e-5, mechanism="rdp"), rel=1e-12
    )


def test_budget_is_never_exceeded_and_a_refused_round_changes_nothing(caplog):
    model, data = tiny_lora_bert(), toy_data()
    acc = PrivacyAccountant("rdp")
    budget, delta = 3.0, 1e-5
    kwargs = dict(
        steps=2, batch_size=2, lr=0.1, noise_multiplier=1.5, max_grad_norm=1.0,
        accountant=acc, delta=delta, epsilon_budget=budget,
    )  # fmt: skip
    ran = 0
    for round_ in range(20):
        before_w, before_acc = flat(trainable(model)), acc.state_dict()
        caplog.clear()
        try:
            with caplog.at_level(logging.WARNING, logger="fedft.privacy.dpsgd"):
                train_private(model, data, seed=round_, **kwargs)
        except BudgetExceededError as err:
            # the node's log says why it refused
            assert [r.getMessage() for r in caplog.records] == [err.decision.message]
            assert not err.decision.allowed and err.decision.level == "sample"
            assert err.decision.epsilon_after > budget
            assert torch.equal(flat(trainable(model)), before_w)
            assert acc.state_dict() == before_acc
            break
        ran += 1
        assert acc.epsilon(delta) <= budget
    else:
        pytest.fail("the budget never refused a round")
    assert ran == 3  # eps after 3 rounds 2.88, after 4 rounds 3.22
    decision = check_budget(
        acc, noise_multiplier=1.5, sample_rate=0.25, steps=2, epsilon_budget=budget, delta=delta
    )
    assert not decision.allowed and "refused" in decision.message


def test_model_is_clean_and_usable_after_training():
    model, data = tiny_lora_bert(), toy_data()
    model.eval()
    train_private(
        model, data, steps=2, batch_size=4, lr=0.1, noise_multiplier=1.0,
        max_grad_norm=1.0, accountant=PrivacyAccountant("rdp"), seed=0,
    )  # fmt: skip
    assert not model.training
    assert not hasattr(model, "autograd_grad_sample_hooks")
    for name, p in model.named_parameters():
        for attr in ("grad_sample", "summed_grad", "_forward_counter"):
            assert not hasattr(p, attr), (name, attr)
        assert p.grad is None
    for name, mod in model.named_modules():
        assert not mod._forward_hooks and not mod._backward_hooks, name
    # an ordinary forward/backward works and fills .grad (no per-sample machinery)
    out = model(input_ids=data.input_ids, attention_mask=data.attention_mask, labels=data.labels)
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    # and it can be trained privately again (no "hooks added twice")
    model.zero_grad(set_to_none=True)
    train_private(
        model, data, steps=1, batch_size=4, lr=0.1, noise_multiplier=1.0,
        max_grad_norm=1.0, accountant=PrivacyAccountant("rdp"), seed=0,
    )  # fmt: skip


def test_refuses_user_level_accountant_and_bad_arguments(caplog):
    model, data = tiny_lora_bert(), toy_data()
    kwargs = dict(steps=1, batch_size=2, lr=0.1, noise_multiplier=1.0, max_grad_norm=1.0, seed=0)
    with pytest.raises(ValueError, match="sample-level"):
        train_private(model, data, accountant=PrivacyAccountant("rdp", level="user"), **kwargs)
    with pytest.raises(ValueError, match="max_grad_norm"):
        train_private(
            model, data, accountant=PrivacyAccountant("rdp"), **{**kwargs, "max_grad_norm": 0}
        )
    with pytest.raises(ValueError, match="physical_batch_size"):
        PerformanceFlags(physical_batch_size=-1)
    acc = PrivacyAccountant("rdp")
    frozen_model = tiny_lora_bert()
    for p in frozen_model.parameters():
        p.requires_grad_(False)
    with pytest.raises(
        ValueError, match=r"^the model has no trainable parameters: nothing to fine-tune$"
    ):
        train_private(frozen_model, data, accountant=PrivacyAccountant("rdp"), **kwargs)
    with pytest.raises(ValueError, match=r"^epsilon_budget needs delta$"):
        train_private(model, data, accountant=acc, epsilon_budget=3.0, **kwargs)
    for bad in ({"steps": -1}, {"lr": 0.0}, {"noise_multiplier": -0.5}):
        settings = {**kwargs, **bad}
        with pytest.raises(
            ValueError,
            match=rf"^steps = {settings['steps']} \(>= 0\), lr = {settings['lr']} \(> 0\), "
            rf"noise_multiplier = {settings['noise_multiplier']} \(>= 0\), max_grad_norm = 1.0 "
            r"\(> 0\)$",
        ):
            train_private(model, data, accountant=acc, **settings)
    # zero steps is a round that trains nothing and spends nothing
    before = trainable(model)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="fedft.privacy.dpsgd"):
        metrics = train_private(model, data, accountant=acc, **{**kwargs, "steps": 0}, delta=1e-5)
    # σ = 1: private, no warning; the round's figures in the client's log
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.INFO, f"DP-SGD round: {metrics}")
    ]
    assert metrics["steps"] == 0.0 and metrics["epsilon_sample"] == 0.0 and acc.steps == 0
    assert math.isnan(metrics.pop("train_loss"))  # no example seen: no loss, not 0
    assert metrics == {
        "steps": 0.0,
        "sample_rate": 0.25,
        "noise_multiplier": 1.0,
        "max_grad_norm": 1.0,
        "mean_batch_size": 0.0,
        "clip_fraction": 0.0,
        "epsilon_sample": 0.0,
        "delta": 1e-5,
    }
    assert all(torch.equal(p, before[n]) for n, p in trainable(model).items())


def test_causal_lm_per_sample_loss_is_independent_of_the_batch():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 6, 11, generator=g)
    labels = torch.randint(0, 11, (3, 6), generator=g)
    labels[0, :4] = -100  # prompt tokens
    labels[2, 1:] = -100
    batch = per_sample_loss(logits, labels)
    for i in range(3):
        alone = per_sample_loss(logits[i : i + 1], labels[i : i + 1])
        torch.testing.assert_close(batch[i : i + 1], alone)
    # example 0: mean CE over its own labelled next tokens (positions 4, 5 predicted by 3, 4)
    manual = torch.nn.functional.cross_entropy(logits[0, 3:5], labels[0, 4:6])
    torch.testing.assert_close(batch[0], manual)
    assert float(batch[2]) == 0.0  # no labelled next token


def test_dp_step_on_tiny_lora_llama_changes_only_adapters():
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
    )  # fmt: skip
    model = get_peft_model(
        LlamaForCausalLM(cfg),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    )
    ids = torch.randint(1, 64, (6, 8))
    labels = ids.clone()
    labels[:, :3] = -100
    data = Encoded(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)
    before_t, before_f = trainable(model), frozen(model)
    metrics = train_private(
        model, data, steps=2, batch_size=3, lr=0.05, noise_multiplier=0.8,
        max_grad_norm=1.0, accountant=PrivacyAccountant("rdp"), seed=0, delta=1e-5,
    )  # fmt: skip
    after_t = trainable(model)
    assert all(not torch.equal(after_t[k], before_t[k]) for k in before_t)
    assert all(torch.equal(w, before_f[k]) for k, w in frozen(model).items())
    assert metrics["epsilon_sample"] > 0


def test_per_sample_loss_against_hand_computed_cross_entropy():
    """Each example's own loss, in float32, with a soft prompt's extra positions skipped."""
    ce = torch.nn.functional.cross_entropy
    g = torch.Generator().manual_seed(3)
    # classification: (B, C) with (B,), half-precision logits give a float32 loss
    logits = torch.randn(4, 3, generator=g)
    labels = torch.tensor([0, 2, 1, 2])
    got = per_sample_loss(logits.to(torch.bfloat16), labels)
    assert got.dtype == torch.float32 and got.shape == (4,)
    want = torch.stack([ce(logits[i].to(torch.bfloat16).float(), labels[i]) for i in range(4)])
    torch.testing.assert_close(got, want)
    # causal LM with 2 virtual tokens in front: logits (B, 2 + T, V), labels (B, T)
    b, p, t, v = 3, 2, 5, 7
    logits = torch.randn(b, p + t, v, generator=g)
    labels = torch.randint(0, v, (b, t), generator=g)
    labels[1, 3] = -100
    labels[2, :4] = -100  # one labelled next token: its loss is that token's, not half of it
    got = per_sample_loss(logits.to(torch.float16), labels)
    assert got.dtype == torch.float32
    for i in range(b):
        # token j (1 <= j < T) is predicted at position p + j - 1 of the logits
        terms = [
            ce(logits[i, p + j - 1].to(torch.float16).float(), labels[i, j])
            for j in range(1, t)
            if labels[i, j] != -100
        ]
        torch.testing.assert_close(got[i], torch.stack(terms).mean())
    for bad_logits, bad_labels, shapes in (
        (
            torch.zeros(2, 5, 7),
            torch.zeros(2, dtype=torch.long),
            r"logits\(2, 5, 7\) with labels\(2,\)",
        ),
        (
            torch.zeros(2, 1, 5, 7),
            torch.zeros(2, 5, dtype=torch.long),
            r"logits\(2, 1, 5, 7\) with labels\(2, 5\)",
        ),
    ):
        with pytest.raises(
            ValueError, match=rf"^{shapes}: want \(B, C\) with \(B,\) or \(B, T, V\) with \(B, T\)$"
        ):
            per_sample_loss(bad_logits, bad_labels)
