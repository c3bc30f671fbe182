"""``python -m bench.qlora_memory``: memory of a 4-bit (NF4) base against fp32, side by side.

A random-weight Llama (hidden 256, 4 layers, vocab 1,000) saved to a temporary folder and
loaded twice through ``fedft.models.load_base_model``: fp32, then ``load_in_4bit=True``
(bitsandbytes). Prints both footprints (``PreTrainedModel.get_memory_footprint``), those of
the quantised linear layers alone, and the ratios.
"""

from __future__ import annotations

import tempfile

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from fedft.models import load_base_model


def main() -> None:
    """Measure and print."""
    import bitsandbytes as bnb

    cfg = LlamaConfig(
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1000,
        pad_token_id=0,
    )
    with tempfile.TemporaryDirectory() as folder:
        torch.manual_seed(0)
        LlamaForCausalLM(cfg).save_pretrained(folder)
        from tokenizers import Tokenizer, models
        from transformers import PreTrainedTokenizerFast

        tok = PreTrainedTokenizerFast(
            tokenizer_object=Tokenizer(models.WordLevel({"[PAD]": 0, "[UNK]": 1}, "[UNK]")),
            pad_token="[PAD]",
        )
        tok.save_pretrained(folder)
        m32, _ = load_base_model(folder, task="causal_lm")
        m4, _ = load_base_model(folder, task="causal_lm", load_in_4bit=True)
    quantised = {n for n, m in m4.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    lin32 = sum(m.weight.numel() * 4 for n, m in m32.named_modules() if n in quantised)
    lin4 = lin32 - (m32.get_memory_footprint() - m4.get_memory_footprint())
    total32, total4 = m32.get_memory_footprint(), m4.get_memory_footprint()
    print(f"bitsandbytes {bnb.__version__}, device cpu, {len(quantised)} linear layers in NF4")
    print("| | fp32 bytes | 4-bit bytes | 4-bit / fp32 |")
    print("|---|---|---|---|")
    print(f"| whole model | {total32:,} | {total4:,} | {total4 / total32:.3f} |")
    print(f"| quantised linear layers | {lin32:,} | {lin4:,} | {lin4 / lin32:.3f} |")
    print(f"RATIO qlora_memory whole model 4-bit/fp32 = {total4 / total32:.3f}")


if __name__ == "__main__":
    main()
