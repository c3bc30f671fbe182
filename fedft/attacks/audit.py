"""The attacks that apply to one run's configuration, on that run's model, data and defences.

``[audit] enabled = true`` (``fedft simulate --audit``) runs this once the run has ended; the
rows go to ``summary.json`` (key ``audit``) and to ``report.html`` next to ε:

* ``adapter.method = "split"``: cut inversion (:mod:`fedft.attacks.cut_inversion`) of what
  the split server receives: client 0's training examples through the run's front
  (``split.front_layers`` blocks, the run's final soft prompt), encoded in
  ``split.wire_dtype`` and decoded as the server decodes it; a ridge inverter fitted on the
  run's public and test text (text the server may hold). Once without any cut defence and,
  when the run has one, with it (``split.privatize = "dx"`` at ``split.dx_epsilon``,
  ``split.cut_noise_std``); against a defence the server knows the mechanism and also fits
  on noised public text, and the better of its two inverters counts. ``blind_guess`` is the
  recovery of a server that ignores the payload (the most frequent public id per position:
  ``[CLS]`` and ``[SEP]`` come for free).
* ``adapter.method = "lora"`` or ``"prompt"`` (classification): label leakage (iDLG, the
  label from the classifier-bias gradient) and token inversion (DLG) of one client update of
  one example, once without a defence and once at the run's settings: DP-SGD's clip
  ``privacy.max_grad_norm`` and client 0's noise multiplier σ (configured or calibrated
  exactly as client 0 calibrates it); user-level DP clips the update but adds its noise on
  the server, after the server has seen it; secure aggregation leaves the server no
  per-client update to attack.

One example and one step is *not* an upper bound on what a client's update of a round
reveals: an example that is in several of a round's DP-SGD steps leaks its label more with
every step (measured in docs/results.md, "released update": at σ = 1, one step reads the
label 0.46 of the time, a 20-step round 1.00, chance 0.25). The DP rows say so in ``note``,
with the run's local steps. Under sample-level DP a LoRA run's audit therefore also attacks the
update a client releases after a round of the run's local steps of one example (``label
(iDLG), released update``; not for prompt runs).
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from typing import Any, cast

import torch
from torch import Tensor, nn

from fedft.attacks.cut_inversion import RidgeInverter, cut_front, recovery_rate
from fedft.attacks.gradient_inversion import (
    infer_label,
    invert_gradient,
    random_guess_f1,
    released_update_label,
    token_f1,
    update_gradients,
)
from fedft.config import RunConfig
from fedft.data.datasets import Records
from fedft.data.encode import Encoded, encode
from fedft.split.dx import CutNoise, DxNoise
from fedft.transport import split_wire as wire

logger = logging.getLogger(__name__)

__all__ = ["audit_run", "cut_audit", "headline", "update_audit"]

#: tokens of the text whose update DLG inverts (short texts: the attack's own regime).
DLG_TOKENS = 6


def audit_run(
    cfg: RunConfig,
    *,
    victims: Records,
    public: Records,
    num_labels: int,
    prompt: Tensor | None = None,
) -> dict[str, Any]:
    """Run the attacks that apply to ``cfg`` (module docstring); the ``audit`` record.

    Args:
        cfg: the run's configuration.
        victims: client 0's training examples (the first ``audit.examples`` are attacked).
        public: text the server holds (fits the cut inverter).
        num_labels: classes of the run's head.
        prompt: the run's final soft prompt (n, H), for split and prompt runs.

    Returns:
        ``{"attacks": [row, ...], "examples": int, "seconds": float}``; each row has
        ``attack``, ``defence`` and its figures (``recovery`` / ``accuracy`` / ``f1`` with
        the chance level beside it).
    """
    from fedft.models import load_base_model

    t0 = time.monotonic()
    attacked = victims.subset(range(min(len(victims), cfg.audit.examples)))
    model, tok = load_base_model(
        cfg.model.name, task=cfg.model.task, num_labels=num_labels, seed=cfg.seed
    )
    model.requires_grad_(False)
    if cfg.adapter.method == "split":
        rows = cut_audit(cfg, model, tok, attacked, public, prompt=prompt)
    else:
        rows = update_audit(
            cfg,
            model,
            tok,
            attacked,
            num_labels=num_labels,
            client_examples=len(victims),
            prompt=prompt,
        )
    seconds = time.monotonic() - t0
    logger.info("audit: %d attack rows in %.1f s", len(rows), seconds)
    return {"attacks": rows, "examples": len(attacked), "seconds": seconds}


# -- split: cut inversion ------------------------------------------------------------------


class _Tokens(nn.Module):
    """A front whose output leaves out the soft prompt's positions (they carry no text)."""

    def __init__(self, front: nn.Module, prompt_tokens: int) -> None:
        super().__init__()
        self.front = front
        self.n = prompt_tokens

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
        hidden, mask = self.front(input_ids, attention_mask)
        return hidden[:, self.n :], mask[:, self.n :]


def _received(hidden: Tensor, dtype: wire.WireDType) -> Tensor:
    """``hidden`` after the split wire's encoding (what the split server decodes)."""
    enc = wire.encode_tensor("hidden", hidden.detach(), dtype)
    return wire.decode_tensor(enc, max_elements=hidden.numel(), expect_shape=tuple(hidden.shape))


def _blind_guess(public: Encoded, victims: Encoded) -> float:
    """Recovery of the most frequent public id at each position (ignores the payload)."""
    t = victims.input_ids.shape[1]
    guess = torch.empty(t, dtype=torch.long)
    for p in range(t):
        real = public.attention_mask[:, p].bool()
        ids = public.input_ids[real, p].tolist() or [0]
        guess[p] = Counter(ids).most_common(1)[0][0]
    return recovery_rate(
        guess.expand_as(victims.input_ids), victims.input_ids, victims.attention_mask
    )


def _defences(cfg: RunConfig) -> tuple[str, DxNoise | None, CutNoise | None]:
    """The run's cut defence in words, and fresh noise modules for it (None: off)."""
    s = cfg.split
    dx = DxNoise(s.dx_epsilon) if s.privatize == "dx" else None
    gauss = CutNoise(s.cut_noise_std) if s.cut_noise_std > 0 else None
    words = [f"dx eps={s.dx_epsilon:g}"] if dx is not None else []
    words += [f"gaussian std={s.cut_noise_std:g} on the cut"] if gauss is not None else []
    return " + ".join(words), dx, gauss


@torch.no_grad()
def cut_audit(
    cfg: RunConfig,
    model: Any,
    tokenizer: Any,
    victims: Records,
    public: Records,
    *,
    prompt: Tensor | None = None,
) -> list[dict[str, Any]]:
    """Token recovery from the cut activations, without and with the run's cut defence."""
    from fedft.prompt.soft_prompt import SoftPrompt

    task, length = cfg.model.task, cfg.data.max_length
    vic = encode(victims, tokenizer, task=task, max_length=length)
    pub = encode(public, tokenizer, task=task, max_length=length)
    depth = cfg.split.front_layers
    front = cut_front(model, depth)
    n = 0
    if prompt is not None:
        n = int(prompt.shape[0])
        front.prompt = SoftPrompt(n, int(prompt.shape[1]), init=prompt.float())
    seen = _Tokens(front, n)
    words = cast(Tensor, model.get_input_embeddings().weight)
    clean_inverter = RidgeInverter.fit(seen, words, pub.input_ids, pub.attention_mask)
    common = {
        "attack": "cut inversion",
        "depth": depth,
        "inverter": "ridge (public text)",
        "wire": cfg.split.wire_dtype,
        "blind_guess": _blind_guess(pub, vic),
    }

    def recovered(inverters: list[RidgeInverter]) -> float:
        sent = _received(seen(vic.input_ids, vic.attention_mask)[0], cfg.split.wire_dtype)
        return max(
            recovery_rate(inv.invert(sent), vic.input_ids, vic.attention_mask) for inv in inverters
        )

    rows = [{**common, "defence": "none", "recovery": recovered([clean_inverter])}]
    name, dx, gauss = _defences(cfg)
    if name:
        front.privatizer, front.cut_noise = dx, gauss
        aware = RidgeInverter.fit(seen, words, pub.input_ids, pub.attention_mask)
        rows.append({**common, "defence": name, "recovery": recovered([clean_inverter, aware])})
        front.privatizer = front.cut_noise = None
    for row in rows:
        logger.info("audit: %s", row)
    return rows


# -- lora / prompt: one client's update -------------------------------------------------------


class _PromptModel(nn.Module):
    """A soft prompt before the (frozen) model, taking ids or embeddings (DLG needs both)."""

    def __init__(self, model: Any, prompt: Tensor) -> None:
        super().__init__()
        from fedft.prompt.soft_prompt import SoftPrompt

        self.model = model
        self.prompt = SoftPrompt(int(prompt.shape[0]), int(prompt.shape[1]), init=prompt.float())

    def get_input_embeddings(self) -> nn.Module:
        return cast(nn.Module, self.model.get_input_embeddings())

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
    ) -> Any:
        if inputs_embeds is None:
            assert input_ids is not None
            inputs_embeds = self.model.get_input_embeddings()(input_ids)
        assert attention_mask is not None
        embeds, mask = self.prompt.prepend(inputs_embeds, attention_mask)
        return self.model(inputs_embeds=embeds, attention_mask=mask)


def _attacked_model(
    cfg: RunConfig, model: Any, prompt: Tensor | None
) -> tuple[nn.Module, dict[str, nn.Parameter]]:
    """The run's trainable parts on a fresh copy of its base model, and those parameters."""
    from fedft.adapters.peft_io import attach_lora
    from fedft.models import default_target_modules, head_parameter_names

    if hasattr(model, "set_attn_implementation"):  # DLG differentiates the gradient
        model.set_attn_implementation("eager")
    head = head_parameter_names(model, cfg.model.task)
    attacked: nn.Module
    if cfg.adapter.method == "prompt":
        if prompt is None:
            raise ValueError("a prompt run's audit needs its soft prompt")
        attacked = _PromptModel(model, prompt)
        attacked.prompt.requires_grad_(True)
        for name, p in model.named_parameters():
            p.requires_grad_(name in head)
    else:
        attacked = attach_lora(
            model,
            target_modules=list(cfg.model.target_modules or default_target_modules(model)),
            rank=cfg.adapter.ranks[0] if cfg.adapter.ranks else cfg.adapter.rank,
            alpha=cfg.adapter.alpha,
            extras=head,
            seed=cfg.seed,
        )
    attacked.eval()
    return attacked, {n: p for n, p in attacked.named_parameters() if p.requires_grad}


def _run_defence(cfg: RunConfig, victims: int) -> tuple[str, float, float]:
    """(words, clip C, σ) of what a client update carries when the server receives it.

    ``victims`` is client 0's example count (σ is calibrated on it as client 0 does).
    """
    from fedft import builders

    p = cfg.privacy
    if p.mode == "sample":
        sigma = builders.client_sigma(cfg, 0, victims)
        return f"DP-SGD sigma={sigma:.3g} C={p.max_grad_norm:g}", p.max_grad_norm, sigma
    if p.mode == "user":  # the server clips, sees, then adds noise to the sum
        return f"user-level clip C={p.max_grad_norm:g} (noise added after)", p.max_grad_norm, 0.0
    return "", 0.0, 0.0


def _defended(
    grad: dict[str, Tensor], clip: float, sigma: float, gen: torch.Generator
) -> dict[str, Tensor]:
    from fedft.privacy.persample import ClippedSum, noisy_mean

    summed = ClippedSum(grad, max_grad_norm=clip)
    summed.add([grad])
    return noisy_mean(summed, noise_multiplier=sigma, expected_batch_size=1, generator=gen)


def update_audit(
    cfg: RunConfig,
    model: Any,
    tokenizer: Any,
    victims: Records,
    *,
    num_labels: int,
    client_examples: int,
    prompt: Tensor | None = None,
) -> list[dict[str, Any]]:
    """Label (iDLG) and token (DLG) recovery from one client's update of one example.

    ``victims``: the attacked examples; ``client_examples``: how many examples client 0
    holds in all (its σ is calibrated on that count, as client 0 calibrates it, not on the
    attacked ones).
    """
    if cfg.aggregation.secure:
        return [
            {
                "attack": attack,
                "defence": "secure aggregation",
                "result": None,
                "note": "the server receives masked vectors and their sum, no client's update",
            }
            for attack in ("label (iDLG)", "tokens (DLG)")
        ]
    if cfg.model.task != "classification":
        return [{"attack": "label (iDLG)", "defence": "-", "result": None, "note": "no head"}]
    enc = encode(victims, tokenizer, task="classification", max_length=cfg.data.max_length)
    attacked, params = _attacked_model(cfg, model, prompt)
    bias = next((n for n in params if n.endswith(("classifier.bias", "score.bias"))), None)
    name, clip, sigma = _run_defence(cfg, client_examples)
    settings = [("none", 0.0, 0.0)] + ([(name, clip, sigma)] if name else [])
    gen = torch.Generator()
    gen.seed()  # fresh OS randomness, as the clients' DP noise
    rows: list[dict[str, Any]] = []
    if bias is not None:
        rows += _label_rows(
            attacked, params, bias, enc, settings, gen, num_labels, cfg.federation.local_steps
        )
    if bias is not None and cfg.privacy.mode == "sample" and cfg.adapter.method == "lora":
        rows += _released_rows(cfg, attacked, params, bias, enc, name, clip, sigma, num_labels)
    if cfg.audit.dlg_steps > 0 and bias is not None:
        rows += _dlg_rows(cfg, attacked, params, bias, enc, settings, gen)
    for row in rows:
        logger.info("audit: %s", row)
    return rows


def _one(enc: Encoded, i: int, length: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    real = int(enc.attention_mask[i].sum())
    t = real if length is None else min(real, length)
    return enc.input_ids[i : i + 1, :t], torch.ones(1, t, dtype=torch.long), enc.labels[i : i + 1]


def _label_rows(
    model: nn.Module,
    params: dict[str, nn.Parameter],
    bias: str,
    enc: Encoded,
    settings: list[tuple[str, float, float]],
    gen: torch.Generator,
    num_labels: int,
    local_steps: int,
) -> list[dict[str, Any]]:
    hits = [0] * len(settings)
    for i in range(len(enc)):
        ids, mask, label = _one(enc, i)
        grad = update_gradients(model, params, attention_mask=mask, label=label, input_ids=ids)
        for k, (_, clip, sigma) in enumerate(settings):
            seen = grad if clip == 0 else _defended(grad, clip, sigma, gen)
            hits[k] += infer_label(seen[bias]) == int(label)
    return [
        {
            "attack": "label (iDLG)",
            "defence": name,
            "accuracy": hits[k] / len(enc),
            "chance": 1.0 / num_labels,
            "trials": len(enc),
            **({"note": _one_step_note(local_steps)} if clip > 0 else {}),
        }
        for k, (name, clip, _) in enumerate(settings)
    ]


def _released_rows(
    cfg: RunConfig,
    model: nn.Module,
    params: dict[str, nn.Parameter],
    bias: str,
    enc: Encoded,
    name: str,
    clip: float,
    sigma: float,
    num_labels: int,
) -> list[dict[str, Any]]:
    """Label leak (iDLG) of the update a DP-SGD client releases after a round of local steps.

    Each attacked example alone is the client's data, so every one of the round's steps
    (fedft's own DP-SGD loop: the run's lr, batch size, clip and σ, AdamW, fresh noise) holds
    it: the attacker's best case for one example. The label is read off the head bias of
    before - after (the server knows what it sent).
    """
    f = cfg.federation
    hits = sum(
        released_update_label(
            model,
            params,
            bias,
            enc.subset([i]),
            steps=f.local_steps,
            batch_size=f.batch_size,
            lr=f.lr,
            noise_multiplier=sigma,
            max_grad_norm=clip,
            seed=None,  # fresh OS randomness, as the clients' DP noise
        )
        == int(enc.labels[i])
        for i in range(len(enc))
    )
    return [
        {
            "attack": "label (iDLG), released update",
            "defence": name,
            "accuracy": hits / len(enc),
            "chance": 1.0 / num_labels,
            "trials": len(enc),
            "local_steps": f.local_steps,
            "note": "one example in every local step of a round: the best case for one example",
        }
    ]


def _one_step_note(local_steps: int) -> str:
    return (
        f"one example, one step: not a bound; a round's update of {local_steps} local steps "
        "leaks an example in several of them more (the released-update row; docs/results.md)"
    )


def _dlg_rows(
    cfg: RunConfig,
    model: nn.Module,
    params: dict[str, nn.Parameter],
    bias: str,
    enc: Encoded,
    settings: list[tuple[str, float, float]],
    gen: torch.Generator,
) -> list[dict[str, Any]]:
    ids, mask, label = _one(enc, 0, DLG_TOKENS)
    grad = update_gradients(model, params, attention_mask=mask, label=label, input_ids=ids)
    vocab = cast(Tensor, model.get_input_embeddings().weight).shape[0]  # type: ignore[operator]
    guess = random_guess_f1(ids[0], torch.arange(vocab), trials=200, seed=cfg.seed)
    rows = []
    for name, clip, sigma in settings:
        seen = grad if clip == 0 else _defended(grad, clip, sigma, gen)
        if all(float(v.norm()) == 0.0 for v in seen.values()):
            f1 = 0.0
        else:
            got = invert_gradient(
                model,
                params,
                seen,
                length=int(ids.shape[1]),
                bias_name=bias,
                steps=cfg.audit.dlg_steps,
                top_k=4,
                sweeps=1,
                seed=cfg.seed,
            )
            f1 = token_f1(got.ids, ids[0])
        rows.append(
            {
                "attack": "tokens (DLG)",
                "defence": name,
                "f1": f1,
                "random_guess_f1": guess,
                "tokens": int(ids.shape[1]),
                "steps": cfg.audit.dlg_steps,
            }
        )
    return rows


def headline(audit: dict[str, Any]) -> str:
    """One line for the console: each attack's result per defence."""
    parts = []
    for row in audit.get("attacks", []):
        value = next((row[k] for k in ("recovery", "accuracy", "f1") if k in row), None)
        shown = "n/a" if value is None or not math.isfinite(float(value)) else f"{value:.2f}"
        parts.append(f"{row['attack']} [{row['defence'] or '-'}] {shown}")
    return "; ".join(parts)
