"""``fedft export``: merged model = base + adapter; rank-r LoRA = best rank-r truncation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedft.adapters import peft_io
from fedft.config import load_config
from fedft.export import ExportError, export_lora, export_merged, read_run, truncate
from fedft.reporting.metrics import write_summary

ROOT = Path(__file__).resolve().parents[1]
MODULES = [f"bert.encoder.layer.{i}.attention.self.{p}" for i in (0, 1) for p in ("query", "value")]


def _fake_run(model_dir: str, run: Path, *, seed: int = 3) -> dict[str, torch.Tensor]:
    """A finished run's folder: full-rank deltas (like a folded FLoRA/FedEx result) + head."""
    g = torch.Generator().manual_seed(seed)
    deltas = {m: 0.05 * torch.randn(32, 32, generator=g) for m in MODULES}
    extras = {
        "classifier.weight": torch.randn(2, 32, generator=g),
        "classifier.bias": torch.randn(2, generator=g),
        "bert.pooler.dense.weight": torch.randn(32, 32, generator=g),
        "bert.pooler.dense.bias": torch.randn(32, generator=g),
    }
    peft_io.save_peft_adapter(
        run / "adapter",
        base_model_source=model_dir,
        deltas=deltas,
        extras=extras,
        task="classification",
        target_modules=["query", "value"],
    )
    cfg = load_config(None, [f"model.name='{model_dir}'"])
    write_summary(run, final={"rounds": 1}, config=cfg.to_dict())
    return deltas


def _inputs(model_dir: str) -> dict[str, torch.Tensor]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    return dict(
        tok(["a fine film", "dull and long, far too long"], padding=True, return_tensors="pt")
    )


def test_merged_model_equals_base_plus_adapter(tiny_bert_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    run = tmp_path / "run"
    deltas = _fake_run(tiny_bert_dir, run)
    out = export_merged(run, tmp_path / "merged")
    merged = AutoModelForSequenceClassification.from_pretrained(out).eval()  # no peft
    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2)
    w0 = {m: base.get_submodule(m).weight.detach().clone() for m in MODULES}
    adapted = PeftModel.from_pretrained(base, str(run / "adapter")).eval()
    batch = _inputs(tiny_bert_dir)
    with torch.no_grad():
        want = adapted(**batch).logits
        got = merged(**batch).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for m in MODULES:  # W = W0 + delta, the folded part included
        torch.testing.assert_close(
            merged.get_submodule(m).weight, w0[m] + deltas[m], atol=1e-5, rtol=0
        )
    assert not any("lora" in k for k in merged.state_dict())
    torch.testing.assert_close(
        merged.classifier.weight, adapted.base_model.model.classifier.modules_to_save.default.weight
    )


def test_truncation_error_is_zero_at_full_rank_and_monotone():
    g = torch.Generator().manual_seed(0)
    deltas = {"m1": torch.randn(12, 8, generator=g), "m2": torch.randn(6, 10, generator=g)}
    errors = [truncate(deltas, r)[1].relative_error for r in range(1, 11)]
    assert errors[0] > 0.3
    assert all(b <= a + 1e-12 for a, b in zip(errors, errors[1:], strict=False)), errors
    assert errors[7] < 1e-12  # r = 8 >= both numerical ranks (8 and 6)
    # the rank-2 error is the discarded singular values' share of the energy
    s = {k: torch.linalg.svdvals(v.double()) for k, v in deltas.items()}
    want = (
        sum(float((v[2:] ** 2).sum()) for v in s.values())
        / sum(float((v**2).sum()) for v in s.values())
    ) ** 0.5
    assert errors[1] == pytest.approx(want, rel=1e-9)


def test_rank_r_lora_is_the_truncation_and_reports_its_error(tiny_bert_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    run = tmp_path / "run"
    deltas = _fake_run(tiny_bert_dir, run)
    errors = []
    for rank in (2, 8, 32):
        out = tmp_path / f"lora{rank}"
        report = export_lora(run, out, rank=rank)
        config = json.loads((out / "adapter_config.json").read_text())
        assert config["r"] == rank and not config["rank_pattern"]
        base = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2)
        loaded = PeftModel.from_pretrained(base, str(out))
        got = {n: f.scaling * f.b @ f.a for n, f in peft_io.get_factors(loaded).items()}
        num = sum(float(torch.linalg.matrix_norm(deltas[m] - got[m]) ** 2) for m in MODULES)
        den = sum(float(torch.linalg.matrix_norm(deltas[m]) ** 2) for m in MODULES)
        assert report.relative_error == pytest.approx((num / den) ** 0.5, rel=1e-4, abs=1e-6)
        errors.append(report.relative_error)
    assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-6


def test_not_a_run_and_prompt_adapters_are_refused(tiny_bert_dir, tmp_path):
    with pytest.raises(ExportError, match="not a finished fedft run"):
        read_run(tmp_path)
    run = tmp_path / "run"
    _fake_run(tiny_bert_dir, run)
    (run / "adapter" / "adapter_config.json").write_text(json.dumps({"peft_type": "PROMPT_TUNING"}))
    with pytest.raises(ExportError, match="soft prompt is an input"):
        export_merged(run, tmp_path / "m")


def test_cli_export(tiny_bert_dir, tmp_path):
    run = tmp_path / "run"
    _fake_run(tiny_bert_dir, run)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "fedft.cli", "export", str(run)]
    ok = subprocess.run(
        [*cmd, "--merged", str(tmp_path / "m"), "--lora", str(tmp_path / "l"), "--rank", "4"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert ok.returncode == 0, ok.stderr
    assert "merged model written to" in ok.stdout and "relative truncation error" in ok.stdout
    assert (tmp_path / "m" / "config.json").is_file() and (
        tmp_path / "l" / "adapter_config.json"
    ).is_file()
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedft.cli",
            "export",
            str(tmp_path / "nothing"),
            "--merged",
            str(tmp_path / "x"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
