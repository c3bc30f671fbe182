"""Before/after of the biggest avoidable cost found in the default simulation: padding.

Rotten Tomatoes snippets are short (most under 40 MiniLM tokens) but were padded to
max_length = 64 in every batch. ``Encoded.as_batch(trim=True)`` (the default now) drops the
columns after the longest real sequence of the batch. This times the same LoRA training
steps on MiniLM with padding kept (before) and trimmed (after), interleaved in one run.

    python -m bench.padding [--steps 10] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time

import torch

from fedft.adapters import peft_io
from fedft.data import build_federated_data
from fedft.data.encode import encode
from fedft.models import load_base_model
from fedft.training.local import train_steps


def _batches(data, *, steps: int, batch_size: int, trim: bool, seed: int):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(len(data), (batch_size,), generator=g)
        yield data.subset(idx).as_batch(trim=trim)


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=16)
    args = p.parse_args(argv)
    fed = build_federated_data(
        dataset="rotten_tomatoes",
        task="classification",
        partition="iid",
        alpha=0.5,
        num_clients=1,
        test_size=100,
        public_size=0,
        max_train_examples=2000,
        seed=0,
    )
    model, tok = load_base_model("minilm", task="classification", seed=0)
    data = encode(fed.clients[0], tok, task="classification", max_length=64)
    lengths = data.attention_mask.sum(1).float()
    pm = peft_io.attach_lora(
        model,
        target_modules=["query", "value"],
        rank=8,
        alpha=16,
        extras=["classifier.weight", "classifier.bias"],
    )
    times = {True: [], False: []}
    for r in range(args.repeats):
        for trim in (False, True):
            t = time.perf_counter()
            train_steps(
                pm,
                _batches(data, steps=args.steps, batch_size=args.batch_size, trim=trim, seed=r),
                lr=1e-3,
                device=torch.device("cpu"),
            )
            times[trim].append(time.perf_counter() - t)
    before, after = min(times[False]), min(times[True])
    print(
        f"tokens per example: mean {lengths.mean():.1f}, p95 {lengths.quantile(0.95):.0f}, "
        f"max_length 64; torch threads {torch.get_num_threads()}"
    )
    print(f"| padding | s per {args.steps} steps (best of {args.repeats}) | s/step |")
    print("|---|---|---|")
    print(f"| to max_length (before) | {before:.2f} | {before / args.steps:.3f} |")
    print(f"| trimmed per batch (after) | {after:.2f} | {after / args.steps:.3f} |")
    print(f"speed-up (before/after): {before / after:.2f}x")
    return {"before_s": before, "after_s": after, "ratio": before / after}


if __name__ == "__main__":
    main()
