"""Split forward/backward equals the unsplit model (fp32) for BERT and Llama; SFPrompt."""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from test_split_support import HIDDEN, batch, tiny_bert, tiny_llama

from fedft.prompt import PromptTunedModel, SoftPrompt
from fedft.split import (
    BodyAdapter,
    el2n,
    keep_top_fraction,
    local_loss,
    select_samples,
    split_model,
    split_train_step,
)

FAMILIES = {"bert": tiny_bert, "llama": tiny_llama}


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_split_step_equals_unsplit(family: str) -> None:
    model = FAMILIES[family](layers=4)
    ref = copy.deepcopy(model)
    ids, mask, labels = batch(family)

    out = ref(input_ids=ids, attention_mask=mask, labels=labels)
    out.loss.backward()

    parts = split_model(model, front_layers=1, back_layers=1)
    assert parts.body_layers == 2
    for p in parts.body.parameters():
        p.requires_grad_(False)
    adapter = BodyAdapter(parts.body, rank=4, alpha=8.0, seed=1)
    loss = split_train_step(parts, adapter, ids, mask, labels)

    assert abs(float(loss) - float(out.loss)) <= 1e-5
    ref_params = dict(ref.named_parameters())
    checked = 0
    body_ids = {id(p) for p in parts.body.parameters()}
    for name, p in model.named_parameters():
        if id(p) in body_ids:
            assert p.grad is None  # frozen shared body
            continue
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, ref_params[name].grad, atol=1e-5, rtol=1e-4)
        checked += 1
    assert checked > 5
    # LoRA grads on the body: dL/dB = s * G_W @ A^T (B = 0 at init), dL/dA = 0.
    body_names = {id(p): n for n, p in model.named_parameters()}
    for key, name in adapter._names.items():
        w = parts.body.get_submodule(name).weight
        g_w = ref_params[body_names[id(w)]].grad
        a = adapter.lora_a[key].detach()
        expect_b = adapter.scaling * g_w @ a.T
        torch.testing.assert_close(adapter.lora_b[key].grad, expect_b, atol=1e-5, rtol=1e-4)
        assert float(adapter.lora_a[key].grad.abs().max()) == 0.0
        assert float(expect_b.abs().max()) > 0


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_split_with_prompt_equals_prompt_model(family: str) -> None:
    model = FAMILIES[family](layers=3)
    wrapped = PromptTunedModel(copy.deepcopy(model), num_tokens=3, seed=2)
    ids, mask, labels = batch(family)
    out = wrapped(ids, mask, labels)
    out.loss.backward()

    parts = split_model(model, front_layers=1, back_layers=1)
    for p in model.parameters():
        p.requires_grad_(False)
    parts.front.prompt = SoftPrompt(3, HIDDEN, seed=2)
    loss = split_train_step(parts, None, ids, mask, labels)
    assert abs(float(loss) - float(out.loss)) <= 1e-5
    torch.testing.assert_close(
        parts.front.prompt.embedding.grad, wrapped.prompt.embedding.grad, atol=1e-5, rtol=1e-4
    )
    if family == "llama":
        assert out.logits.shape[1] == ids.shape[1] + 3


def test_adapters_per_client_do_not_share_state() -> None:
    model = tiny_llama(layers=3)
    parts = split_model(model, front_layers=1, back_layers=1)
    for p in parts.body.parameters():
        p.requires_grad_(False)
    a1 = BodyAdapter(parts.body, rank=2, alpha=4.0, seed=0)
    a2 = BodyAdapter(parts.body, rank=2, alpha=4.0, seed=0)
    before = {k: v.clone() for k, v in parts.body.state_dict().items()}
    with torch.no_grad():
        for p in a1.lora_b.values():
            p.fill_(0.5)
    h = torch.randn(2, 5, HIDDEN)
    m = torch.ones(2, 5, dtype=torch.long)
    plain = parts.body(h, m)
    out2 = a2.run(parts.body, h, m)
    out1 = a1.run(parts.body, h, m)
    torch.testing.assert_close(out2, plain)  # client 2 sees nothing of client 1's update
    assert float((out1 - plain).abs().max()) > 1e-3
    torch.testing.assert_close(parts.body(h, m), plain)
    for k, v in parts.body.state_dict().items():
        assert torch.equal(v, before[k])


def test_adapter_forwards_interleaved_on_two_threads_each_use_only_their_adapter() -> None:
    """The split server's worker hands the body over between blocks, so two clients'
    forwards interleave on two threads; each must still run with its own adapter only.

    Worst order: 1 pauses at block 1, 2 starts and pauses at block 1, 1 finishes, 2 finishes.
    """
    model = tiny_llama(layers=4)
    parts = split_model(model, front_layers=1, back_layers=1)
    for p in parts.body.parameters():
        p.requires_grad_(False)
    adapters = [BodyAdapter(parts.body, rank=2, alpha=4.0, seed=s) for s in (0, 1)]
    with torch.no_grad():
        for value, adapter in zip((0.5, -0.7), adapters, strict=True):
            for p in adapter.lora_b.values():
                p.fill_(value)
    h = torch.randn(2, 5, HIDDEN)
    m = torch.ones(2, 5, dtype=torch.long)
    solo = [a.run(parts.body, h, m).detach() for a in adapters]
    params = dict(parts.body.named_parameters())
    values = {k: v.clone() for k, v in parts.body.state_dict().items()}

    gates: dict[int, tuple[threading.Event, threading.Event]] = {}

    def pause(module: torch.nn.Module, args: tuple[object, ...]) -> None:
        gate = gates.get(threading.get_ident())
        if gate is not None:
            gate[0].set()  # arrived at block 1
            assert gate[1].wait(30)  # until told to go on

    outs: dict[int, torch.Tensor] = {}
    errors: list[BaseException] = []

    def job(i: int, gate: tuple[threading.Event, threading.Event]) -> None:
        gates[threading.get_ident()] = gate
        try:
            outs[i] = adapters[i].run(parts.body, h, m).detach()
        except BaseException as err:  # reported by the main thread
            errors.append(err)
            gate[0].set()

    handle = parts.body.layers[1].register_forward_pre_hook(pause)
    try:
        gate = [(threading.Event(), threading.Event()) for _ in adapters]
        threads = [threading.Thread(target=job, args=(i, gate[i])) for i in (0, 1)]
        threads[0].start()
        assert gate[0][0].wait(30)
        threads[1].start()
        assert gate[1][0].wait(30)
        gate[0][1].set()
        threads[0].join(30)
        gate[1][1].set()
        threads[1].join(30)
    finally:
        handle.remove()
    assert not errors, errors
    for i in (0, 1):
        torch.testing.assert_close(outs[i], solo[i])
        merged = torch.func.functional_call(parts.body, adapters[i].weights(parts.body), (h, m))
        torch.testing.assert_close(solo[i], merged)  # W x + s B (A x) == (W + s B A) x
    assert dict(parts.body.named_parameters()) == params  # the same Parameter objects
    for k, v in parts.body.state_dict().items():
        assert torch.equal(v, values[k]), k


def test_el2n_matches_definition_and_keep_fraction_scales() -> None:
    logits = torch.tensor([[10.0, -10.0], [0.0, 0.0], [-10.0, 10.0]])
    labels = torch.tensor([0, 0, 0])
    s = el2n(logits, labels)
    assert s[0] < 1e-3
    assert abs(float(s[1]) - (0.5**2 * 2) ** 0.5) < 1e-6
    assert abs(float(s[2]) - 2**0.5) < 1e-3
    scores = torch.arange(100.0)
    for gamma, k in [(0.1, 10), (0.25, 25), (0.5, 50), (1.0, 100)]:
        kept = keep_top_fraction(scores, gamma)
        assert kept.numel() == k
        assert int(kept.min()) == 100 - k  # the hardest (highest) ones
    with pytest.raises(ValueError):
        keep_top_fraction(scores, 0.0)


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_select_samples_uses_shortcut_and_scales(family: str) -> None:
    model = FAMILIES[family](layers=3)
    parts = split_model(model, front_layers=1, back_layers=1)
    calls = []
    parts.body.register_forward_hook(lambda *a: calls.append(1))
    ids, mask, labels = batch(family, b=20, seed=3)
    sizes = [select_samples(parts, ids, mask, labels, gamma=g).numel() for g in (0.2, 0.5, 1.0)]
    assert sizes == [4, 10, 20]
    assert calls == []  # the body (server) is never touched
    loss, _ = local_loss(parts, ids, mask, labels)
    assert torch.isfinite(loss)
