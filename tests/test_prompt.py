"""Soft prompt tuning: shapes, masks, labels, what trains, get/set."""

from __future__ import annotations

import pytest
import torch
from test_split_support import HIDDEN, batch, tiny_bert, tiny_llama

from fedft.prompt import PromptTunedModel, SoftPrompt, get_prompt, set_prompt


def test_prepend_extends_embeddings_mask_and_labels() -> None:
    sp = SoftPrompt(4, HIDDEN, seed=0)
    emb = torch.randn(2, 5, HIDDEN)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    e, m = sp.prepend(emb, mask)
    assert e.shape == (2, 9, HIDDEN) and m.shape == (2, 9)
    assert torch.equal(e[:, :4], sp.embedding.detach().expand(2, -1, -1))
    assert torch.equal(e[:, 4:], emb)
    assert torch.equal(m[:, :4], torch.ones(2, 4, dtype=torch.long)) and torch.equal(m[:, 4:], mask)
    lab = sp.extend_labels(torch.tensor([[5, 6, -100]]))
    assert lab.tolist() == [[-100] * 4 + [5, 6, -100]]


@pytest.mark.parametrize("train_head", [False, True])
def test_only_prompt_and_optionally_head_train(train_head: bool) -> None:
    model = tiny_bert(layers=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    wrapped = PromptTunedModel(model, num_tokens=3, train_head=train_head)
    names = {n for n, p in wrapped.named_parameters() if p.requires_grad}
    expect = {"prompt.embedding"} | (
        {"model.classifier.weight", "model.classifier.bias"} if train_head else set()
    )
    assert names == expect
    opt = torch.optim.Adam([p for p in wrapped.parameters() if p.requires_grad], lr=1e-2)
    ids, mask, labels = batch("bert", b=8)
    losses = []
    for _ in range(15):
        opt.zero_grad()
        out = wrapped(ids, mask, labels)
        out.loss.backward()
        opt.step()
        losses.append(float(out.loss))
    assert out.logits.shape == (8, 3)
    assert losses[-1] < losses[0]
    for k, v in model.state_dict().items():
        changed = not torch.equal(v, before[k])
        assert changed == (train_head and k.startswith("classifier")), k


def test_causal_lm_prompt_ignores_prompt_positions_in_loss() -> None:
    model = tiny_llama(layers=2)
    wrapped = PromptTunedModel(model, num_tokens=2, seed=1)
    ids, mask, labels = batch("llama", b=2, t=6)
    out = wrapped(ids, mask, labels)
    assert out.logits.shape == (2, 8, model.config.vocab_size)
    # Same loss computed by hand: shift, prompt positions -100.
    full = torch.cat([torch.full((2, 2), -100), labels], dim=1)
    ref = torch.nn.functional.cross_entropy(
        out.logits[:, :-1].reshape(-1, out.logits.shape[-1]), full[:, 1:].reshape(-1)
    )
    assert abs(float(out.loss) - float(ref)) < 1e-5
    with pytest.raises(ValueError):
        PromptTunedModel(tiny_llama(layers=2), num_tokens=2, train_head=True)


def test_get_set_prompt_roundtrip_and_shape_check() -> None:
    wrapped = PromptTunedModel(tiny_bert(layers=2), num_tokens=3)
    new = torch.randn(3, HIDDEN)
    set_prompt(wrapped, new)
    assert torch.equal(get_prompt(wrapped), new)
    got = get_prompt(wrapped)
    got += 1  # a copy: the model is unchanged
    assert torch.equal(get_prompt(wrapped), new)
    ids, mask, _ = batch("bert", b=2)
    a = wrapped(ids, mask).logits
    set_prompt(wrapped, new * 3)
    assert not torch.allclose(a, wrapped(ids, mask).logits)
    with pytest.raises(ValueError):
        set_prompt(wrapped, torch.randn(4, HIDDEN))
