"""What a curious server recovers from fedft's payloads, measured (docs/results.md).

Run: ``python -m simulations.attacks --out runs/attacks`` writes ``attacks.json`` and prints
one line per (attack, defence):

* cut inversion: the split client's front output at depth 0/1/2 (fedft.split.front_forward's
  code path, bf16 on the wire as the split client sends it) on rotten_tomatoes texts, inverted
  by nearest embedding (depth 0) and a ridge inverter fitted on other (public) texts; then
  the same at the split default depth 1 with SAP's d_χ noise at each ``--dx-epsilons``;
* label leakage (iDLG) from a batch-of-one LoRA + head gradient, without defence and under
  fedft's DP-SGD step (clip C = 1, noise σC) at each ``--sigmas``;
* gradient inversion (DLG) of the same update's tokens, without defence and under DP-SGD.

The cut attacks run on ``--model`` (``minilm``: the pretrained 6-layer MiniLM, or ``tiny``:
fedft's 2-layer random test model); the gradient attacks on a 2-layer random BERT with a
100-id vocabulary (double backward through a real model is out of reach on a CPU here).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any, cast

import torch

from fedft.adapters.peft_io import attach_lora
from fedft.attacks import (
    RidgeInverter,
    cut_front,
    depth0_candidates,
    infer_label,
    invert_gradient,
    nearest_embedding_invert,
    random_guess_f1,
    recovery_rate,
    token_f1,
    update_gradients,
)
from fedft.data.datasets import load_records
from fedft.models import load_base_model, tiny_model
from fedft.privacy.persample import ClippedSum, noisy_mean
from fedft.split.dx import DxNoise
from fedft.transport import split_wire as wire

logger = logging.getLogger(__name__)


def _received(hidden: torch.Tensor) -> torch.Tensor:
    enc = wire.encode_tensor("hidden", hidden.detach(), "bf16")
    return wire.decode_tensor(enc, max_elements=hidden.numel(), expect_shape=tuple(hidden.shape))


def cut_attacks(
    model_name: str, *, private: int, public: int, length: int, epsilons: list[float]
) -> list[dict[str, Any]]:
    """Recovery rate at depth 0, 1, 2 (no noise) and at depth 1 under d_χ noise."""
    if model_name == "tiny":
        model, tok = tiny_model("classification", family="bert")
    else:
        model, tok = load_base_model(model_name, task="classification", num_labels=2)
    texts = load_records("rotten_tomatoes", task="classification").text
    enc = tok(
        texts[: private + public],
        padding="max_length",
        truncation=True,
        max_length=length,
        return_tensors="pt",
    )
    ids, mask = enc["input_ids"][:private], enc["attention_mask"][:private]
    pub_ids, pub_mask = enc["input_ids"][private:], enc["attention_mask"][private:]
    words = cast(torch.Tensor, model.get_input_embeddings().weight)
    cands = depth0_candidates(model, length)
    rows: list[dict[str, Any]] = []
    for depth in (0, 1, 2):
        front = cut_front(model, depth)
        with torch.no_grad():
            sent = _received(front(ids, mask)[0])
            inv = RidgeInverter.fit(front, words, pub_ids, pub_mask)
            nearest = recovery_rate(nearest_embedding_invert(sent, cands), ids, mask)
            ridge = recovery_rate(inv.invert(sent), ids, mask)
        rows.append(
            {
                "attack": "cut inversion",
                "model": model_name,
                "depth": depth,
                "defence": "none",
                "nearest": nearest,
                "ridge": ridge,
            }
        )
    front = cut_front(model, 1)
    with torch.no_grad():
        inv = RidgeInverter.fit(front, words, pub_ids, pub_mask)
        for eps in epsilons:
            front.privatizer = DxNoise(eps, seed=0)
            sent = _received(front(ids, mask)[0])
            rows.append(
                {
                    "attack": "cut inversion",
                    "model": model_name,
                    "depth": 1,
                    "defence": f"dx eps={eps:g}",
                    "dx_epsilon": eps,
                    "ridge": recovery_rate(inv.invert(sent), ids, mask),
                }
            )
        front.privatizer = None
    return rows


def lora_label_model(
    num_labels: int = 4, vocab_size: int = 100
) -> tuple[Any, dict[str, torch.nn.Parameter], str]:
    """A tiny BERT classifier with LoRA on query/value + head: (model, trainable, bias name).

    Eager attention: DLG differentiates the gradient (double backward). ``vocab_size`` 100 by
    default; 30,522 is MiniLM's (its tokenizer's) vocabulary.
    """
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(  # type: ignore[call-arg]
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=32,
        num_labels=num_labels,
        attn_implementation="eager",
    )
    model = attach_lora(
        BertForSequenceClassification(cfg).eval(),
        target_modules=["query", "value"],
        rank=4,
        alpha=8,
        extras=["classifier.weight", "classifier.bias"],
        seed=0,
    )
    model.eval()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    return model, params, next(n for n in params if n.endswith("classifier.bias"))


def _dp(
    grad: dict[str, torch.Tensor], sigma: float, gen: torch.Generator
) -> dict[str, torch.Tensor]:
    summed = ClippedSum(grad, max_grad_norm=1.0)
    summed.add([grad])
    return noisy_mean(summed, noise_multiplier=sigma, expected_batch_size=1, generator=gen)


def gradient_attacks(
    *,
    label_trials: int,
    dlg_trials: int,
    sigmas: list[float],
    dlg_steps: int,
    vocab: int = 100,
) -> list[dict[str, Any]]:
    """Label accuracy (iDLG) and token F1 (DLG), without defence and under DP-SGD.

    ``vocab``: the tiny model's vocabulary; texts are uniform ids in [5, vocab).
    """
    model, params, bias = lora_label_model(vocab_size=vocab)
    gen = torch.Generator().manual_seed(0)
    hits = {s: 0 for s in [0.0, *sigmas]}
    for _ in range(label_trials):
        ids = torch.randint(5, vocab, (1, 6), generator=gen)
        y = torch.randint(0, 4, (1,), generator=gen)
        g = update_gradients(
            model, params, attention_mask=torch.ones_like(ids), label=y, input_ids=ids
        )
        for s in hits:
            seen = g if s == 0.0 else _dp(g, s, gen)
            hits[s] += infer_label(seen[bias]) == int(y)
    rows: list[dict[str, Any]] = [
        {
            "attack": "label (iDLG)",
            "defence": "none" if s == 0 else f"DP-SGD sigma={s:g} C=1",
            "accuracy": hits[s] / label_trials,
            "chance": 0.25,
            "trials": label_trials,
        }
        for s in hits
    ]
    f1: dict[float, list[float]] = {s: [] for s in [0.0, *sigmas]}
    guess = []
    for t in range(dlg_trials):
        ids = torch.randint(5, vocab, (1, 4), generator=gen)
        y = torch.randint(0, 4, (1,), generator=gen)
        g = update_gradients(
            model, params, attention_mask=torch.ones_like(ids), label=y, input_ids=ids
        )
        guess.append(random_guess_f1(ids[0], torch.arange(5, vocab), trials=500, seed=t))
        for s in f1:
            seen = g if s == 0.0 else _dp(g, s, gen)
            r = invert_gradient(
                model,
                params,
                seen,
                length=4,
                bias_name=bias,
                steps=dlg_steps,
                top_k=4,
                sweeps=1,
                seed=t,
            )
            f1[s].append(token_f1(r.ids, ids[0]))
    if dlg_trials < 1:
        return rows
    rows += [
        {
            "attack": "tokens (DLG)",
            "defence": "none" if s == 0 else f"DP-SGD sigma={s:g} C=1",
            "f1": sum(v) / len(v),
            "f1_each": v,
            "random_guess_f1": sum(guess) / len(guess),
            "trials": dlg_trials,
            "vocab": vocab,
        }
        for s, v in f1.items()
    ]
    return rows


def shipped_dp() -> tuple[Any, float, float, int]:
    """The default config with ``privacy.mode = "sample"``: (config, client 0's σ, C, n_0).

    σ is calibrated exactly as client 0 calibrates it (ε = 3, δ = 1e-5, PRV, q = B / n_0 over
    ``rounds x local_steps`` steps).
    """
    from fedft import builders
    from fedft.config import build_config
    from fedft.data import build_federated_data

    cfg = build_config({"privacy": {"mode": "sample"}})
    fed = build_federated_data(**builders.data_kwargs(cfg))
    sigma = builders.client_sigma(cfg, 0, len(fed.clients[0]))
    return cfg, sigma, cfg.privacy.max_grad_norm, len(fed.clients[0])


def shipped_label_attack(
    *, trials: int, batches: int, sigmas: tuple[float, ...] = ()
) -> list[dict[str, Any]]:
    """Label leakage (iDLG) on the shipped default model under the shipped DP-SGD step.

    The model: MiniLM, LoRA r = 8 on query/value + head; the step: client 0's calibrated σ,
    C = 1 (:func:`shipped_dp`). Examples come from all clients' training data, so the
    labels are balanced where a skewed client's are not (client 0 holds 5 % of one class:
    "always guess the other" would score 0.95 there). Two readings of one DP-SGD step:

    * a batch of one (the attacker's best case): ``trials`` examples, half of each label;
      the label is read off the head-bias gradient;
    * the shipped batch of 16: ``batches`` random batches; the label the batch holds most of
      (ties skipped). ``prior_guess`` is what always naming the more frequent majority scores.

    ``sigmas``: further noise multipliers read on the same gradients (same C), beside the
    shipped σ (e.g. 1.0: the σC ≥ 1 the issue's target names).
    """
    cfg, sigma, clip, n0 = shipped_dp()
    peft, params, bias, every = _shipped_victim()
    ids, masks, labels = every.input_ids, every.attention_mask, every.labels
    gen = torch.Generator().manual_seed(0)
    batch = cfg.federation.batch_size

    def example_grad(i: int) -> dict[str, torch.Tensor]:
        t = int(masks[i].sum())
        return update_gradients(
            peft,
            params,
            attention_mask=masks[i : i + 1, :t],
            label=labels[i : i + 1],
            input_ids=ids[i : i + 1, :t],
        )

    by_label = [torch.nonzero(labels == c).flatten() for c in (0, 1)]
    noise = {"dp": sigma, **{f"dp{s:g}": s for s in sigmas}}
    one = dict.fromkeys(["none", *noise], 0)
    for t in range(trials):
        pool = by_label[t % 2]
        i = int(pool[int(torch.randint(0, len(pool), (1,), generator=gen))])
        g = example_grad(i)
        y = int(labels[i])
        one["none"] += infer_label(g[bias]) == y
        for k, s in noise.items():
            one[k] += infer_label(_noised([g], s, clip, 1, gen)[bias]) == y
    many = dict.fromkeys(["none", *noise], 0)
    majors: list[int] = []
    for _ in range(batches):
        idx = torch.randperm(len(labels), generator=gen)[:batch].tolist()
        ones = int(labels[idx].sum())
        if 2 * ones == len(idx):
            continue
        major = int(2 * ones > len(idx))
        majors.append(major)
        grads = [example_grad(j) for j in idx]
        mean = {n: sum(g[n] for g in grads) / len(idx) for n in params}
        many["none"] += infer_label(mean[bias]) == major
        for k, s in noise.items():
            many[k] += infer_label(_noised(grads, s, clip, batch, gen)[bias]) == major
    counted = max(1, len(majors))
    prior = max(majors.count(0), majors.count(1)) / counted
    common = {"model": cfg.model.name, "clients": cfg.federation.num_clients, "n0": n0}
    names = {"none": "none", "dp": f"DP-SGD shipped: sigma={sigma:.3f} C={clip:g}"}
    names.update({f"dp{s:g}": f"DP-SGD sigma={s:g} C={clip:g}" for s in sigmas})
    rows = [
        {
            **common,
            "attack": "label (iDLG), batch of one",
            "defence": d,
            "accuracy": one[k] / trials,
            "prior_guess": 0.5,
            "trials": trials,
        }
        for k, d in names.items()
    ]
    if batches > 0:
        rows += [
            {
                **common,
                "attack": f"batch majority label (iDLG), batch {batch}",
                "defence": d,
                "accuracy": many[k] / counted,
                "prior_guess": prior,
                "trials": len(majors),
            }
            for k, d in names.items()
        ]
    return rows


def _noised(
    grads: list[dict[str, torch.Tensor]],
    sigma: float,
    clip: float,
    batch: int,
    gen: torch.Generator,
) -> dict[str, torch.Tensor]:
    summed = ClippedSum(grads[0], max_grad_norm=clip)
    summed.add(grads)
    return noisy_mean(summed, noise_multiplier=sigma, expected_batch_size=batch, generator=gen)


def _dp_adamw(
    model: Any,
    params: dict[str, torch.nn.Parameter],
    batch: dict[str, torch.Tensor],
    *,
    steps: int,
    lr: float,
    sigma: float,
    gen: torch.Generator,
) -> None:
    """``steps`` AdamW steps on one example, each on its DP-SGD gradient, in train mode.

    Each gradient is clipped to C = 1 and noised with σC, as a batch of one (fedft's
    ``ClippedSum`` + ``noisy_mean``).
    """
    opt = torch.optim.AdamW(list(params.values()), lr=lr, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        loss = model(**batch).loss
        grads = torch.autograd.grad(loss, list(params.values()))
        noised = _noised([dict(zip(params, grads, strict=True))], sigma, 1.0, 1, gen)
        for n, p in params.items():
            p.grad = noised[n].to(p.dtype)
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval()


def adamw_dlg(
    *, trials: int, local_steps: int, lr: float, dlg_steps: int, sigmas: tuple[float, ...] = ()
) -> list[dict[str, Any]]:
    """DLG and iDLG against the update a LoRA client really sends: ``local_steps`` AdamW steps.

    The client's local loop (:func:`fedft.training.local.train_steps`, AdamW, train mode) on
    one 4-token example of the tiny vocabulary-100 model; the server knows the global model
    (the state before) and inverts ``before - after`` with the same cosine objective as for
    one gradient (any positive multiple of the gradient would match it exactly; AdamW's
    update is not one). Beside it, the single-gradient attack on the same example, and for
    each of ``sigmas`` the same AdamW steps on DP-SGD gradients (:func:`_dp_adamw`; the
    noise has its own generator, so the texts are the same with or without ``sigmas``).
    """
    from fedft.training.local import train_steps

    model, params, bias = lora_label_model()
    gen = torch.Generator().manual_seed(11)
    noise = torch.Generator().manual_seed(12)
    kw: dict[str, Any] = {"length": 4, "bias_name": bias, "steps": dlg_steps, "top_k": 4}
    cases = ["gradient", "adamw", *(f"dp{s:g}" for s in sigmas)]
    got: dict[str, list[float]] = {k: [] for k in cases}
    labels = dict.fromkeys(cases, 0)
    for t in range(trials):
        ids = torch.randint(5, 100, (1, 4), generator=gen)
        y = torch.randint(0, 4, (1,), generator=gen)
        mask = torch.ones_like(ids)
        grad = update_gradients(model, params, attention_mask=mask, label=y, input_ids=ids)
        before = {n: p.detach().clone() for n, p in params.items()}
        batch = {"input_ids": ids, "attention_mask": mask, "labels": y}
        train_steps(model, [batch] * local_steps, lr=lr, device=torch.device("cpu"))
        model.eval()
        delta = {n: before[n] - p.detach() for n, p in params.items()}
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(before[n])
        seen_by = {"gradient": grad, "adamw": delta}
        for sigma in sigmas:
            _dp_adamw(model, params, batch, steps=local_steps, lr=lr, sigma=sigma, gen=noise)
            seen_by[f"dp{sigma:g}"] = {n: before[n] - p.detach() for n, p in params.items()}
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(before[n])
        for name, seen in seen_by.items():
            labels[name] += infer_label(seen[bias]) == int(y)
            r = invert_gradient(model, params, seen, sweeps=1, seed=t, **kw)
            got[name].append(token_f1(r.ids, ids[0]))
    guess = random_guess_f1(torch.arange(5, 9), torch.arange(5, 100), trials=500)
    return [
        {
            "attack": "tokens (DLG) + label (iDLG)",
            "observed": "one gradient"
            if k == "gradient"
            else f"{local_steps} AdamW steps lr={lr:g}"
            + ("" if k == "adamw" else f", DP-SGD sigma={k[2:]} C=1 on each"),
            "f1": sum(v) / len(v),
            "f1_each": v,
            "label_accuracy": labels[k] / trials,
            "random_guess_f1": guess,
            "trials": trials,
        }
        for k, v in got.items()
    ]


def _shipped_victim() -> tuple[Any, dict[str, torch.nn.Parameter], str, Any]:
    """The shipped model (MiniLM, LoRA r = 8 on query/value + head) and its encoded data.

    Returns (peft model, trainable params, head-bias name, all clients' training examples).
    """
    from fedft import builders
    from fedft.config import build_config
    from fedft.data import build_federated_data
    from fedft.data.encode import Encoded, encode
    from fedft.models import default_target_modules, head_parameter_names

    cfg = build_config({"privacy": {"mode": "sample"}})
    fed = build_federated_data(**builders.data_kwargs(cfg))
    model, tok = load_base_model(cfg.model.name, task="classification", num_labels=2)
    model.requires_grad_(False)
    peft = attach_lora(
        model,
        target_modules=default_target_modules(model),
        rank=cfg.adapter.rank,
        alpha=cfg.adapter.alpha,
        extras=head_parameter_names(model, "classification"),
        seed=0,
    )
    peft.eval()
    params = {n: p for n, p in peft.named_parameters() if p.requires_grad}
    bias = next(n for n in params if n.endswith("classifier.bias"))
    parts = [
        encode(c, tok, task="classification", max_length=cfg.data.max_length) for c in fed.clients
    ]
    data = Encoded(
        torch.cat([e.input_ids for e in parts]),
        torch.cat([e.attention_mask for e in parts]),
        torch.cat([e.labels for e in parts]),
    )
    return peft, params, bias, data


def released_label_attack(
    *,
    trials: int,
    sigmas: tuple[float, ...],
    local_steps: tuple[int, ...],
    examples: tuple[int, ...],
    model_name: str = "tiny",
    lr: float = 5e-4,
    batch_size: int = 16,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Label leakage (iDLG) of the update a DP-SGD client releases, not of one gradient.

    The client runs fedft's own DP-SGD loop (:func:`fedft.privacy.dpsgd.train_private`, the
    function ``client/local_round.py`` calls: Opacus per-example clipping to C = 1, N(0, σ²C²)
    on the sum, AdamW, train mode) for ``steps`` steps at the shipped lr and batch 16 on its
    data: ``n`` examples that all carry one label (n = 1: iDLG's batch of one; n > 1: a client
    whose data share a label, as under label skew). With n ≤ 16 the Poisson rate is q = 1:
    every step holds every example. The server knows the state it sent and reads the label
    off ``before - after`` of the head bias (:func:`~fedft.attacks.infer_label`). σ = 0 is
    clipping without noise.

    ``model_name``: ``"tiny"`` (2-layer random BERT, vocabulary 100, 4 classes, random 6-token
    texts) or ``"minilm"`` (the shipped model, 2 classes, real training examples drawn from
    all clients, the labels alternating so that chance is 0.5).

    Returns one row per (n, steps, σ): accuracy over ``trials`` fresh (text, label) draws.
    The same texts and labels for every σ of one (n, steps).
    """
    from fedft.attacks import released_update_label
    from fedft.data.encode import Encoded
    from fedft.seeds import derive_seed

    if model_name == "tiny":
        num_labels = 4
        model, params, bias = lora_label_model(num_labels)
    else:
        num_labels = 2
        model, params, bias, pool = _shipped_victim()
        by_label = [torch.nonzero(pool.labels == c).flatten() for c in (0, 1)]
    torch.manual_seed(seed)  # dropout in the client's train-mode steps
    rows: list[dict[str, Any]] = []
    for n in examples:
        for steps in local_steps:
            gen = torch.Generator().manual_seed(derive_seed(seed, n, steps))
            hits = dict.fromkeys(sigmas, 0)
            for t in range(trials):
                if model_name == "tiny":
                    ids = torch.randint(5, 100, (n, 6), generator=gen)
                    y = int(torch.randint(0, num_labels, (1,), generator=gen))
                    data = Encoded(ids, torch.ones_like(ids), torch.full((n,), y))
                else:
                    y = t % 2
                    pick = torch.randint(0, len(by_label[y]), (n,), generator=gen)
                    data = pool.subset(by_label[y][pick])
                for i, sigma in enumerate(sigmas):
                    hits[sigma] += (
                        released_update_label(
                            model,
                            params,
                            bias,
                            data,
                            steps=steps,
                            batch_size=batch_size,
                            lr=lr,
                            noise_multiplier=sigma,
                            max_grad_norm=1.0,
                            seed=derive_seed(seed, n, steps, t, i),
                        )
                        == y
                    )
            rows += [
                {
                    "attack": "label (iDLG) of the released DP-SGD update",
                    "model": model_name,
                    "examples": n,
                    "local_steps": steps,
                    "defence": "clip only" if s == 0 else f"DP-SGD sigma={s:g} C=1",
                    "sigma": s,
                    "accuracy": hits[s] / trials,
                    "chance": 1 / num_labels,
                    "trials": trials,
                }
                for s in sigmas
            ]
    return rows


def main(argv: list[str] | None = None) -> int:
    """Run every attack, write ``OUT/attacks.json``, log one line per row."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/attacks"))
    p.add_argument("--model", default="minilm", help="'minilm' or 'tiny' (cut attacks)")
    p.add_argument("--private", type=int, default=32, help="attacked texts")
    p.add_argument("--public", type=int, default=256, help="public texts for the ridge fit")
    p.add_argument("--length", type=int, default=24, help="tokens per text")
    p.add_argument("--dx-epsilons", type=float, nargs="*", default=[1000, 300, 100, 30])
    p.add_argument(
        "--sigmas",
        nargs="*",
        default=["1.0"],
        help="DP-SGD σ for the tiny-model iDLG / DLG rows; 'shipped' = client 0's calibrated σ",
    )
    p.add_argument("--label-trials", type=int, default=100)
    p.add_argument("--dlg-trials", type=int, default=2, help="0 = skip DLG")
    p.add_argument("--dlg-steps", type=int, default=40)
    p.add_argument("--dlg-vocab", type=int, default=100, help="tiny model's vocabulary (DLG)")
    p.add_argument(
        "--shipped-trials",
        type=int,
        default=0,
        help="iDLG on the default model under the shipped DP-SGD step (0 = skip)",
    )
    p.add_argument("--shipped-batches", type=int, default=20, help="batches of 16 (shipped)")
    p.add_argument(
        "--adamw-trials",
        type=int,
        default=0,
        help="only: DLG on a real 20-step AdamW LoRA update (shipped lr) vs one gradient",
    )
    p.add_argument(
        "--shipped-sigmas",
        type=float,
        nargs="*",
        default=[],
        help="further σ read on the shipped model's gradients beside the shipped σ",
    )
    p.add_argument(
        "--adamw-dp",
        action="store_true",
        help="with --adamw-trials: also the AdamW update on DP-SGD gradients at each --sigmas",
    )
    p.add_argument(
        "--released-trials",
        type=int,
        default=0,
        help="only: iDLG on the update a DP-SGD client releases (tiny model), per σ / steps / n",
    )
    p.add_argument(
        "--released-sigmas",
        nargs="*",
        default=["0", "shipped", "1", "2", "4", "8"],
        help="σ for --released-trials ('shipped' = client 0's calibrated σ; 0 = clip only)",
    )
    p.add_argument("--released-steps", type=int, nargs="*", default=[1, 20])
    p.add_argument("--released-model", default="tiny", help="'tiny' or 'minilm' (released)")
    p.add_argument(
        "--released-examples", type=int, nargs="*", default=[1], help="examples, one label"
    )
    p.add_argument("--only-shipped", action="store_true", help="run only --shipped-trials")
    p.add_argument(
        "--only-gradients", action="store_true", help="skip the cut attacks (iDLG, DLG only)"
    )
    a = p.parse_args(argv)
    sigmas = [shipped_dp()[1] if v == "shipped" else float(v) for v in a.sigmas]
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    t0 = time.time()
    if a.released_trials > 0:
        logging.getLogger("fedft.privacy.dpsgd").setLevel(logging.ERROR)  # one line per call
        released = tuple(shipped_dp()[1] if v == "shipped" else float(v) for v in a.released_sigmas)
        rows = released_label_attack(
            trials=a.released_trials,
            sigmas=released,
            local_steps=tuple(a.released_steps),
            examples=tuple(a.released_examples),
            model_name=a.released_model,
        )
        for r in rows:
            logger.info("%s", json.dumps(r))
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "attacks.json").write_text(json.dumps(rows, indent=2))
        logger.info("%d rows in %.0f s", len(rows), time.time() - t0)
        return 0
    if a.adamw_trials > 0:
        rows = adamw_dlg(
            trials=a.adamw_trials,
            local_steps=20,
            lr=5e-4,
            dlg_steps=a.dlg_steps,
            sigmas=tuple(s for s in sigmas if s > 0) if a.adamw_dp else (),
        )
        for r in rows:
            logger.info("%s", json.dumps(r))
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "attacks.json").write_text(json.dumps(rows, indent=2))
        return 0
    if a.only_shipped:
        rows = shipped_label_attack(
            trials=a.shipped_trials, batches=a.shipped_batches, sigmas=tuple(a.shipped_sigmas)
        )
        for r in rows:
            logger.info("%s", json.dumps(r))
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "attacks.json").write_text(json.dumps(rows, indent=2))
        return 0
    rows = (
        []
        if a.only_gradients
        else cut_attacks(
            a.model, private=a.private, public=a.public, length=a.length, epsilons=a.dx_epsilons
        )
    )
    for r in rows:
        logger.info("%s", json.dumps(r))
    grad_rows = gradient_attacks(
        label_trials=a.label_trials,
        dlg_trials=a.dlg_trials,
        sigmas=sigmas,
        dlg_steps=a.dlg_steps,
        vocab=a.dlg_vocab,
    )
    for r in grad_rows:
        logger.info("%s", json.dumps(r))
    rows += grad_rows
    if a.shipped_trials > 0:
        shipped = shipped_label_attack(
            trials=a.shipped_trials, batches=a.shipped_batches, sigmas=tuple(a.shipped_sigmas)
        )
        for r in shipped:
            logger.info("%s", json.dumps(r))
        rows += shipped
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "attacks.json").write_text(json.dumps(rows, indent=2))
    logger.info("%d rows in %.0f s -> %s", len(rows), time.time() - t0, a.out / "attacks.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
