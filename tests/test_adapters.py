"""LoRA math (effective delta, pad/truncate, SVD) and peft state I/O on tiny models."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel

from fedft.adapters import effective_delta, numerical_rank, pad_rank, svd_factors, truncate_rank
from fedft.adapters.peft_io import (
    attach_lora,
    base_delta_applied,
    detach_lora,
    get_extras,
    get_factors,
    save_peft_adapter,
    set_extras,
    set_factors,
)
from fedft.models import head_parameter_names, tiny_model
from fedft.types import AggregationResult, ClientUpdate, LoraFactors


def _factors(out: int, inp: int, rank: int, *, seed: int, scaling: float = 1.0) -> LoraFactors:
    g = torch.Generator().manual_seed(seed)
    return LoraFactors(
        a=torch.randn(rank, inp, generator=g),
        b=torch.randn(out, rank, generator=g),
        scaling=scaling,
    )


def _batch(tokenizer, n: int = 3) -> dict[str, torch.Tensor]:
    texts = ["a fine movie", "dull and far too long, sadly", "plot: a dog goes home"][:n]
    return dict(tokenizer(texts, padding=True, return_tensors="pt"))


# ---------------------------------------------------------------- math


def test_effective_delta_of_mapping_and_update() -> None:
    f = _factors(5, 4, 2, seed=0, scaling=0.5)
    fedsb = LoraFactors(a=f.a, b=f.b, scaling=2.0, r=torch.tensor([[1.0, 2.0], [0.0, -1.0]]))
    got = effective_delta({"m": f, "n": fedsb})
    torch.testing.assert_close(got["m"], 0.5 * f.b @ f.a)
    torch.testing.assert_close(got["n"], 2.0 * f.b @ fedsb.r @ f.a)
    upd = ClientUpdate(client_id="c", adapters={"m": f}, num_examples=3)
    assert effective_delta(upd).keys() == {"m"}
    torch.testing.assert_close(effective_delta(upd)["m"], got["m"])


def test_effective_delta_of_result_sums_base_and_adapters() -> None:
    f = _factors(5, 4, 2, seed=1, scaling=2.0)
    g = _factors(5, 4, 3, seed=2)
    dense = torch.randn(5, 4, generator=torch.Generator().manual_seed(3))
    res = AggregationResult(adapters={"m": f}, base_delta={"m": dense, "k": g})
    got = effective_delta(res)
    assert got.keys() == {"m", "k"}
    torch.testing.assert_close(got["m"], dense + 2.0 * f.b @ f.a)
    torch.testing.assert_close(got["k"], g.b @ g.a)
    with pytest.raises(ValueError, match="cannot be summed"):
        effective_delta(AggregationResult(adapters={"m": f}, base_delta={"m": torch.zeros(4, 4)}))


def test_pad_and_truncate_are_exact() -> None:
    f = _factors(6, 7, 3, seed=4, scaling=0.25)
    p = pad_rank(f, 8)
    assert p.a.shape == (8, 7) and p.b.shape == (6, 8) and p.scaling == 0.25
    assert torch.equal(p.a[3:], torch.zeros(5, 7)) and torch.equal(p.b[:, 3:], torch.zeros(6, 5))
    torch.testing.assert_close(p.delta(), f.delta(), rtol=0, atol=0)
    t = truncate_rank(p, 3)
    assert torch.equal(t.a, f.a) and torch.equal(t.b, f.b)
    # Truncating a real component changes the delta by exactly that component.
    t2 = truncate_rank(f, 2)
    torch.testing.assert_close(f.delta() - t2.delta(), 0.25 * f.b[:, 2:] @ f.a[2:])
    r = torch.randn(3, 3)
    sb = LoraFactors(a=f.a, b=f.b, scaling=1.0, r=r)
    torch.testing.assert_close(pad_rank(sb, 5).delta(), sb.delta())
    with pytest.raises(ValueError):
        pad_rank(f, 2)
    with pytest.raises(ValueError):
        truncate_rank(f, 4)


def test_svd_factors_exact_at_numerical_rank() -> None:
    f = _factors(20, 12, 3, seed=5)
    delta = f.delta()
    assert numerical_rank(delta) == 3
    g = svd_factors(delta, None, scaling=0.5)
    assert g.rank == 3 and g.scaling == 0.5
    torch.testing.assert_close(g.delta(), delta, atol=1e-5, rtol=1e-5)
    # Larger rank than the matrix allows: zero padded, still exact.
    big = svd_factors(delta, 15)
    assert big.rank == 15
    torch.testing.assert_close(big.delta(), delta, atol=1e-5, rtol=1e-5)
    # Zero delta: rank 1 of zeros.
    z = svd_factors(torch.zeros(4, 3), None)
    assert z.rank == 1 and torch.count_nonzero(z.delta()) == 0


def test_svd_factors_is_best_low_rank() -> None:
    m = torch.randn(10, 8, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    s = torch.linalg.svdvals(m)
    g = svd_factors(m, 2)
    assert g.a.dtype == torch.float64
    err = torch.linalg.matrix_norm(m - g.delta())
    # Eckart-Young: the Frobenius error of the best rank-2 approximation.
    torch.testing.assert_close(err, torch.sqrt((s[2:] ** 2).sum()))


# ---------------------------------------------------------------- peft I/O


@pytest.fixture(scope="module")
def bert():
    return tiny_model("classification", family="bert", seed=0)


@pytest.fixture(scope="module")
def llama():
    return tiny_model("causal_lm", family="llama", seed=0)


def _trainable(model) -> dict[str, int]:
    return {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}


def test_attach_get_set_roundtrip(bert) -> None:
    model, _ = bert
    pm = attach_lora(model, target_modules=["query", "value"], rank=4, alpha=8)
    try:
        fs = get_factors(pm)
        assert sorted(fs) == [
            f"bert.encoder.layer.{i}.attention.self.{m}" for i in (0, 1) for m in ("query", "value")
        ]
        for f in fs.values():
            assert f.a.shape == (4, 32) and f.b.shape == (32, 4) and f.scaling == 2.0
            assert torch.count_nonzero(f.b) == 0  # peft init: B = 0
        new = {k: _factors(32, 32, 4, seed=i, scaling=0.5) for i, k in enumerate(sorted(fs))}
        set_factors(pm, new)
        back = get_factors(pm)
        for k in new:
            assert torch.equal(back[k].a, new[k].a) and torch.equal(back[k].b, new[k].b)
            assert back[k].scaling == 0.5
        bad = dict(new)
        bad[sorted(new)[0]] = _factors(32, 32, 3, seed=9)
        with pytest.raises(ValueError, match="does not fit"):
            set_factors(pm, bad)
        with pytest.raises(KeyError, match="missing"):
            set_factors(pm, {sorted(new)[0]: new[sorted(new)[0]]})
        with pytest.raises(KeyError, match="unknown"):
            set_factors(pm, {"nope": new[sorted(new)[0]]}, strict=False)
    finally:
        detach_lora(pm)


def test_lora_forward_matches_dense_delta(bert) -> None:
    model, tok = bert
    batch = _batch(tok)
    pm = attach_lora(model, target_modules=["query", "value"], rank=3, alpha=6)
    try:
        fs = {k: _factors(32, 32, 3, seed=i, scaling=0.1) for i, k in enumerate(get_factors(pm))}
        set_factors(pm, fs)
        with torch.no_grad():
            lora_out = pm(**batch).logits
    finally:
        base = detach_lora(pm)
    with base_delta_applied(base, effective_delta(fs)), torch.no_grad():
        dense_out = base(**batch).logits
    torch.testing.assert_close(lora_out, dense_out, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("trainable", "per_module"),
    [("ab", 2 * 4 * 32), ("b", 4 * 32), ("r", 4 * 4)],
)
def test_trainable_modes_freeze_the_right_params(bert, trainable, per_module) -> None:
    model, _ = bert
    extras = head_parameter_names(model, "classification")
    pm = attach_lora(
        model,
        target_modules=["query", "value"],
        rank=4,
        alpha=4,
        trainable=trainable,
        extras=extras,
    )
    try:
        tr = _trainable(pm)
        head = sum(p.numel() for n, p in model.named_parameters() if n in extras)
        assert sum(tr.values()) == 4 * per_module + head
        lora_names = [n for n in tr if ".lora_" in n]
        assert len(lora_names) == 4 * (2 if trainable == "ab" else 1)
        if trainable == "b":
            assert all("lora_B" in n for n in lora_names)
        if trainable == "r":
            assert all(n.endswith("lora_B.default.0.weight") for n in lora_names)
        assert not any(
            ".lora_" not in n and n.split("base_model.model.")[-1] not in extras for n in tr
        )
    finally:
        detach_lora(pm)


def test_fedsb_layer_computes_b_r_a(llama) -> None:
    model, _ = llama
    pm = attach_lora(model, target_modules=["q_proj", "v_proj"], rank=3, alpha=6, trainable="r")
    try:
        fs = get_factors(pm)
        name = "model.layers.0.self_attn.q_proj"
        f = fs[name]
        assert f.r is not None and f.r.shape == (3, 3) and torch.count_nonzero(f.r) == 0
        g = torch.Generator().manual_seed(7)
        new = {
            k: LoraFactors(a=v.a, b=v.b, scaling=v.scaling, r=torch.randn(3, 3, generator=g))
            for k, v in fs.items()
        }
        set_factors(pm, new)
        layer = pm.base_model.model.get_submodule(name)
        w0 = layer.get_base_layer().weight.detach()
        x = torch.randn(5, w0.shape[1], generator=g)
        with torch.no_grad():
            got = layer(x)
        f = new[name]
        want = x @ (w0 + 2.0 * f.b @ f.r @ f.a).T
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(effective_delta(get_factors(pm))[name], 2.0 * f.b @ f.r @ f.a)
        # Plain factors into a Fed-SB adapter are refused.
        with pytest.raises(ValueError, match="Fed-SB"):
            set_factors(pm, {name: LoraFactors(a=f.a, b=f.b, scaling=1.0)}, strict=False)
        # R trains and moves the output; B and A stay frozen.
        out = pm(input_ids=torch.tensor([[101, 2023, 2003, 102]]), labels=None).logits
        out.pow(2).mean().backward()
        seq = layer.lora_B["default"]
        assert seq[0].weight.grad is not None and seq[0].weight.grad.abs().sum() > 0
        assert seq[1].weight.grad is None and layer.lora_A["default"].weight.grad is None
        assert not any(True for _ in layer.buffers())
    finally:
        pm.zero_grad(set_to_none=True)
        detach_lora(pm)


def test_seeded_attach_shares_a(llama) -> None:
    model, _ = llama
    outs = []
    for _ in range(2):
        pm = attach_lora(model, target_modules=["q_proj"], rank=2, alpha=2, trainable="b", seed=3)
        outs.append(get_factors(pm))
        detach_lora(pm)
    for k in outs[0]:
        assert torch.equal(outs[0][k].a, outs[1][k].a)


def test_detach_restores_base_exactly(bert) -> None:
    model, tok = bert
    batch = _batch(tok)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with torch.no_grad():
        ref = model(**batch).logits
    for i, (rank, mode) in enumerate([(2, "ab"), (8, "r"), (5, "b")]):
        pm = attach_lora(
            model, target_modules=["query", "value"], rank=rank, alpha=rank, trainable=mode
        )
        fs = get_factors(pm)
        g = torch.Generator().manual_seed(i)
        set_factors(
            pm,
            {
                k: LoraFactors(
                    a=torch.randn_like(f.a),
                    b=torch.randn(f.b.shape, generator=g),
                    scaling=f.scaling,
                    r=None if f.r is None else torch.randn(f.r.shape, generator=g),
                )
                for k, f in fs.items()
            },
        )
        with torch.no_grad():
            assert not torch.allclose(pm(**batch).logits, ref)
        base = detach_lora(pm)
        assert base is model and not isinstance(base, PeftModel)
        assert not hasattr(base, "peft_config")
    after = dict(model.named_parameters())
    assert after.keys() == before.keys()
    assert all(torch.equal(after[n], before[n]) for n in before)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, ref)


def test_extras_roundtrip_through_peft(bert) -> None:
    model, _ = bert
    names = head_parameter_names(model, "classification")
    orig = get_extras(model, names)
    pm = attach_lora(model, target_modules=["query"], rank=2, alpha=2, extras=names)
    try:
        new = {n: torch.randn_like(t) for n, t in orig.items()}
        set_extras(pm, new)
        got = get_extras(pm, names)
        assert all(torch.equal(got[n], new[n]) for n in names)
        with pytest.raises(ValueError, match="shape"):
            set_extras(pm, {"classifier.bias": torch.zeros(7)})
    finally:
        detach_lora(pm)
        set_extras(model, orig)


def test_base_delta_applied_restores_exactly(bert) -> None:
    model, tok = bert
    batch = _batch(tok)
    name = "bert.encoder.layer.1.attention.self.value"
    w = model.get_submodule(name).weight
    w0 = w.detach().clone()
    delta = torch.randn(32, 32) * 1e-3
    with torch.no_grad():
        ref = model(**batch).logits
    with base_delta_applied(model, {name: delta}):
        assert torch.equal(w, w0 + delta)
    assert torch.equal(w, w0)
    with pytest.raises(RuntimeError), base_delta_applied(model, {name: delta}):
        raise RuntimeError("boom")
    assert torch.equal(w, w0)
    with (
        pytest.raises(ValueError, match="shape"),
        base_delta_applied(model, {name: torch.zeros(3, 3)}),
    ):
        pass
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, ref)


def test_save_peft_adapter_reloads_exactly(bert, tmp_path) -> None:
    model, tok = bert
    batch = _batch(tok)
    g = torch.Generator().manual_seed(11)
    mods = [
        f"bert.encoder.layer.{i}.attention.self.{m}" for i in (0, 1) for m in ("query", "value")
    ]
    # Heterogeneous ranks, like a FLoRA base delta plus adapters.
    deltas = {
        m: _factors(32, 32, r, seed=20 + r, scaling=0.3).delta() for m, r in zip(mods, [1, 2, 3, 5])
    }
    names = head_parameter_names(model, "classification")
    orig = get_extras(model, names)
    extras = {n: torch.randn(t.shape, generator=g) for n, t in orig.items()}
    save_peft_adapter(
        tmp_path,
        base_model_source="tiny",
        deltas=deltas,
        extras=extras,
        task="classification",
        target_modules=["query", "value"],
    )
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert sorted(cfg["rank_pattern"].values()) == [1, 2, 3, 5]
    with torch.no_grad():
        plain = model(**batch).logits
    set_extras(model, extras)
    try:
        with base_delta_applied(model, deltas), torch.no_grad():
            want = model(**batch).logits
    finally:
        set_extras(model, orig)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    loaded = PeftModel.from_pretrained(model, tmp_path)
    try:
        loaded.eval()
        with torch.no_grad():
            got = loaded(**batch).logits
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        assert (got - plain).abs().max() > 1e-3  # the adapter does change the model
    finally:
        base = detach_lora(loaded)
        for n, p in base.named_parameters():
            p.requires_grad_(flags[n])
    with torch.no_grad():
        assert torch.equal(base(**batch).logits, plain)
    with pytest.raises(ValueError, match="target_modules"):
        save_peft_adapter(
            tmp_path / "x",
            base_model_source="tiny",
            deltas=deltas,
            extras={},
            task="classification",
            target_modules=["query"],
        )


@pytest.mark.parametrize("trainable", ["r", "ab"])
def test_opacus_per_sample_grads(bert, trainable) -> None:
    """Opacus hooks every trainable (plain nn.Linear) and per-sample grads sum to the grad."""
    from opacus import GradSampleModule

    model, tok = bert
    extras = head_parameter_names(model, "classification")
    pm = attach_lora(
        model,
        target_modules=["query", "value"],
        rank=3,
        alpha=3,
        trainable=trainable,
        extras=extras,
    )
    gsm = GradSampleModule(pm, loss_reduction="sum")
    try:
        gsm.train()
        fs = get_factors(pm)
        g = torch.Generator().manual_seed(0)
        set_factors(
            pm,
            {
                k: LoraFactors(
                    a=f.a,
                    b=torch.randn(f.b.shape, generator=g),
                    scaling=f.scaling,
                    r=None if f.r is None else torch.randn(f.r.shape, generator=g),
                )
                for k, f in fs.items()
            },
        )
        batch = _batch(tok)
        gsm(**batch).logits.pow(2).sum().backward()
        trainables = [(n, p) for n, p in pm.named_parameters() if p.requires_grad]
        assert len(trainables) == 4 * (1 if trainable == "r" else 2) + len(extras)
        for name, p in trainables:
            assert p.grad_sample is not None and p.grad_sample.shape == (3, *p.shape), name
            torch.testing.assert_close(p.grad_sample.sum(0), p.grad, atol=1e-5, rtol=1e-4)
    finally:
        gsm._close()
        pm.zero_grad(set_to_none=True)
        detach_lora(pm)
        model.eval()
