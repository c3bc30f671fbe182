"""Offline base models: sources, seeded heads, head parameters, tiny test models."""

from __future__ import annotations

import math
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers import BertModel

from fedft import models
from fedft.adapters.peft_io import attach_lora, detach_lora, get_factors
from fedft.models import (
    default_target_modules,
    head_parameter_names,
    load_base_model,
    load_count,
    resolve_model_source,
    tiny_model,
)


def test_resolve_model_source(tmp_path: Path) -> None:
    path, gguf = resolve_model_source("minilm")
    assert gguf is None and (Path(path) / "config.json").is_file()
    assert resolve_model_source("org/some-model") == ("org/some-model", None)
    assert resolve_model_source(str(tmp_path)) == (str(tmp_path), None)
    f = tmp_path / "m.Q4.gguf"
    f.write_bytes(b"GGUF")
    assert resolve_model_source(str(f)) == (str(tmp_path), "m.Q4.gguf")


def test_tiny_models_are_seeded_and_counted() -> None:
    n0 = load_count()
    m1, tok = tiny_model("classification", family="bert", seed=3)
    m2, _ = tiny_model("classification", family="bert", seed=3)
    m3, _ = tiny_model("classification", family="bert", seed=4)
    assert load_count() == n0 + 3
    s1, s2, s3 = m1.state_dict(), m2.state_dict(), m3.state_dict()
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    assert not torch.equal(s1["classifier.weight"], s3["classifier.weight"])
    assert m1.config.hidden_size == 32 and m1.config.num_hidden_layers == 2
    assert m1.config.vocab_size == len(tok) and tok.pad_token is not None
    assert not m1.training
    assert default_target_modules(m1) == ["query", "value"]
    assert head_parameter_names(m1, "classification") == [
        "bert.pooler.dense.bias",
        "bert.pooler.dense.weight",
        "classifier.bias",
        "classifier.weight",
    ]


def test_tiny_llama_both_tasks() -> None:
    lm, tok = tiny_model("causal_lm", family="llama")
    assert default_target_modules(lm) == ["q_proj", "v_proj"]
    assert head_parameter_names(lm, "causal_lm") == []
    batch = tok(["hello there", "a b"], padding=True, return_tensors="pt")
    out = lm(**batch, labels=batch["input_ids"])
    # An untrained LM is near uniform: loss close to log(vocab).
    assert abs(out.loss.item() - math.log(len(tok))) < 1.0
    clf, _ = tiny_model("classification", family="llama", num_labels=3)
    assert head_parameter_names(clf, "classification") == ["score.weight"]
    assert clf(**batch).logits.shape == (2, 3)


def test_default_target_modules_unknown_family() -> None:
    m = nn.Linear(2, 2)
    m.config = SimpleNamespace(model_type="my_own_arch")  # type: ignore[assignment]
    with pytest.raises(ValueError, match="model.target_modules"):
        default_target_modules(m)
    with pytest.raises(ValueError, match="family"):
        tiny_model("classification", family="gpt2")  # type: ignore[arg-type]


def test_load_base_model_from_local_folder(tmp_path: Path) -> None:
    """A checkpoint without pooler/classifier: both are new, seeded, and head parameters."""
    tiny, tok = tiny_model("classification", family="bert", seed=0)
    encoder = BertModel(tiny.config, add_pooling_layer=False)
    encoder.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    n0 = load_count()
    a, tok_a = load_base_model(str(tmp_path), task="classification", num_labels=3, seed=1)
    b, _ = load_base_model(str(tmp_path), task="classification", num_labels=3, seed=1)
    c, _ = load_base_model(str(tmp_path), task="classification", num_labels=3, seed=2)
    assert load_count() == n0 + 3
    assert not a.training and a.dtype == torch.float32
    names = head_parameter_names(a, "classification")
    assert names == [
        "bert.pooler.dense.bias",
        "bert.pooler.dense.weight",
        "classifier.bias",
        "classifier.weight",
    ]
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["classifier.weight"], sc["classifier.weight"])
    # Checkpoint weights are loaded, not re-initialised.
    enc = encoder.state_dict()
    assert torch.equal(
        sa["bert.encoder.layer.0.attention.self.query.weight"],
        enc["encoder.layer.0.attention.self.query.weight"],
    )
    # The seed does not leak into the global RNG.
    torch.manual_seed(123)
    x = torch.rand(3)
    torch.manual_seed(123)
    load_base_model(str(tmp_path), task="classification", seed=5)
    assert torch.equal(torch.rand(3), x)
    batch = tok_a(["good", "bad film"], padding=True, return_tensors="pt")
    assert a(**batch).logits.shape == (2, 3)


def test_load_base_model_rejects_bad_task() -> None:
    with pytest.raises(ValueError, match="task"):
        load_base_model("minilm", task="regression")  # type: ignore[arg-type]


@pytest.mark.real_model
def test_real_minilm_offline() -> None:
    a, tok = load_base_model("minilm", task="classification", seed=0)
    b, _ = load_base_model("minilm", task="classification", seed=0)
    assert type(a).__name__ == "BertForSequenceClassification"
    assert a.config.hidden_size == 384 and a.config.num_hidden_layers == 6
    # The checkpoint has a pooler: only the classifier is new.
    assert head_parameter_names(a, "classification") == ["classifier.bias", "classifier.weight"]
    assert torch.equal(a.classifier.weight, b.classifier.weight)
    batch = tok(["a gripping, funny film", "tedious and flat"], padding=True, return_tensors="pt")
    with torch.no_grad():
        base_out = a(**batch).logits
    pm = attach_lora(
        a,
        target_modules=default_target_modules(a),
        rank=4,
        alpha=8,
        extras=head_parameter_names(a, "classification"),
    )
    try:
        assert len(get_factors(pm)) == 12
        out = pm(**batch, labels=torch.tensor([1, 0]))
        torch.testing.assert_close(out.logits.detach(), base_out)  # B = 0 at init
        out.loss.backward()
        grads = [p.grad for n, p in pm.named_parameters() if "lora_B" in n]
        assert len(grads) == 12 and all(g is not None and g.abs().sum() > 0 for g in grads)
    finally:
        base = detach_lora(pm)
    with torch.no_grad():
        assert torch.equal(base(**batch).logits, base_out)


@pytest.mark.slow
@pytest.mark.real_model
def test_smollm2_converts_once_and_generates(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("FEDFT_CACHE", str(tmp_path))
    model, tok = load_base_model("smollm2-135m", task="causal_lm")
    folder = tmp_path / models.SMOLLM2
    assert (folder / "config.json").is_file()
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temp folder left
    assert not hasattr(model.config, "quantization_config")
    t0 = time.perf_counter()
    again, _ = load_base_model("smollm2-135m", task="causal_lm")
    assert time.perf_counter() - t0 < 20
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), again.parameters()))
    assert default_target_modules(model) == ["q_proj", "v_proj"] and tok.pad_token is not None
    batch = tok(["The capital of France is Paris."], return_tensors="pt")
    with torch.no_grad():
        loss = model(**batch, labels=batch["input_ids"]).loss.item()
    assert loss < 6.0  # a random 49k-vocab model sits near log(49152) ≈ 10.8
