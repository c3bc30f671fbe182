"""Privacy audit: a loss-threshold membership-inference attack on a federated fine-tune.

Yeom et al. (2018): a model fits its training examples better than unseen ones, so the
per-example loss separates members from non-members. The attack's score is ``-loss``; its
ROC AUC over members (every client's training examples) vs non-members (the held-out test
set, the same size) is 0.5 for a model that leaks nothing about membership. DP-SGD bounds
how far above 0.5 any attack can get (for ε at δ: TPR ≤ e^ε·FPR + δ).

Run: ``python -m simulations.mia simulations/audit.toml --out runs/audit`` trains the same
config without DP and at each ε in ``--epsilons`` and prints a table (docs/results.md).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fedft import builders
from fedft.config import RunConfig, build_config, load_config
from fedft.data import Records, build_federated_data
from fedft.data.encode import encode, eval_batches

logger = logging.getLogger(__name__)


def auc(member_scores: Tensor, nonmember_scores: Tensor) -> float:
    """ROC AUC of separating members (positives) from non-members: P(s_m > s_n) + ties/2."""
    m, n = member_scores.double(), nonmember_scores.double()
    greater = (m[:, None] > n[None, :]).double().mean()
    ties = (m[:, None] == n[None, :]).double().mean()
    return float(greater + 0.5 * ties)


@torch.no_grad()
def per_example_loss(model: Any, records: Records, tokenizer: Any, *, max_length: int) -> Tensor:
    """Cross-entropy of every example (classification): (N,)."""
    data = encode(records, tokenizer, task="classification", max_length=max_length)
    model.eval()
    out = []
    for batch in eval_batches(data, batch_size=64):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        out.append(torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="none"))
    return torch.cat(out)


def audit_run(cfg: RunConfig, out: Path, *, progress: bool = False) -> dict[str, Any]:
    """Train ``cfg`` (simulation), then attack the saved adapter; returns the figures."""
    from peft import PeftModel

    from fedft.models import load_base_model
    from simulations.simulate import simulate

    summary = simulate(cfg, out, progress=progress)
    fed = build_federated_data(**builders.data_kwargs(cfg))
    members = [r for c in fed.clients for r in _rows(c)]
    nonmembers = _rows(fed.test)[: len(members)]
    members = members[: len(nonmembers)]
    base, tok = load_base_model(cfg.model.name, task="classification", seed=cfg.seed)
    model = PeftModel.from_pretrained(base, str(out / "adapter"))
    loss_in = per_example_loss(model, _records(members, fed), tok, max_length=cfg.data.max_length)
    loss_out = per_example_loss(
        model, _records(nonmembers, fed), tok, max_length=cfg.data.max_length
    )
    return {
        "privacy": cfg.privacy.mode,
        "epsilon_target": cfg.privacy.epsilon if cfg.privacy.mode != "off" else None,
        "epsilon_spent": summary["epsilon"],
        "test_accuracy": summary["after"]["accuracy"],
        "member_loss": float(loss_in.mean()),
        "nonmember_loss": float(loss_out.mean()),
        "attack_auc": auc(-loss_in, -loss_out),
        "members": len(members),
    }


def _rows(r: Records) -> list[tuple[str, Any, str]]:
    return list(zip(r.text, r.target, r.group, strict=True))


def _records(rows: list[tuple[str, Any, str]], fed: Any) -> Records:
    return Records(
        text=[t for t, _, _ in rows],
        target=[y for _, y, _ in rows],
        group=[g for _, _, g in rows],
        label_names=fed.label_names,
    )


def main(argv: list[str] | None = None) -> int:
    """Run the audit without DP and at each ε; print and save a markdown table."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("config")
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--out", default="runs/audit")
    p.add_argument("--epsilons", default="3,8")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    base = load_config(args.config, args.set)
    out = Path(args.out)
    rows = []
    settings: list[tuple[str, dict[str, Any]]] = [("off", {"mode": "off"})]
    for e in args.epsilons.split(","):
        settings.append((f"eps{e}", {"mode": "sample", "epsilon": float(e)}))
    for label, privacy in settings:
        table = base.to_dict()
        table["privacy"].update(privacy)
        rows.append(audit_run(build_config(table), out / label))
        logger.info("audit %s: %s", label, rows[-1])
    (out / "audit.json").write_text(json.dumps(rows, indent=2) + "\n")
    lines = [
        "| DP | ε target | ε spent | test acc | member loss | non-member loss | attack AUC |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        eps_t = "-" if r["epsilon_target"] is None else f"{r['epsilon_target']:g}"
        eps_s = "-" if r["epsilon_spent"] is None else f"{r['epsilon_spent']:.2f}"
        lines.append(
            f"| {r['privacy']} | {eps_t} | {eps_s} | {r['test_accuracy']:.3f} | "
            f"{r['member_loss']:.3f} | {r['nonmember_loss']:.3f} | {r['attack_auc']:.3f} |"
        )
    text = "\n".join(lines) + "\n"
    (out / "audit.md").write_text(text)
    print(text)  # noqa: T201
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
