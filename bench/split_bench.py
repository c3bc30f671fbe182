"""Split learning: one step over loopback gRPC vs the same step in process; wire bytes.

Run: ``python bench/split_bench.py`` (from the repository root). Prints, per wire dtype,
steps/s over gRPC and in process, their ratio, and payload bytes per sample against the
analytic ``4 * T * H * bytes`` (activations up, body output down, two gradients) + the
``T`` mask bytes.
"""

from __future__ import annotations

import asyncio
import copy
import sys
import time
from pathlib import Path

import torch
from transformers import BertConfig, BertForSequenceClassification

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from client.split_client import SplitClient  # noqa: E402
from fedft.split import BodyAdapter, split_model, split_train_step  # noqa: E402
from server.split_service import build_service, start_server  # noqa: E402

B, T, H, LAYERS, STEPS = 8, 64, 256, 6, 5
BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


def make_model() -> BertForSequenceClassification:
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=1000,
        hidden_size=H,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        intermediate_size=4 * H,
        max_position_embeddings=T,
        num_labels=2,
    )
    return BertForSequenceClassification(cfg).eval()


def data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return (
        torch.randint(0, 1000, (B, T), generator=g),
        torch.ones(B, T, dtype=torch.long),
        torch.randint(0, 2, (B,), generator=g),
    )


def in_process(model: BertForSequenceClassification) -> float:
    parts = split_model(model, front_layers=1, back_layers=1)
    for p in parts.body.parameters():
        p.requires_grad_(False)
    adapter = BodyAdapter(parts.body, rank=8, alpha=16.0)
    batch = data()
    split_train_step(parts, adapter, *batch)  # warm-up
    start = time.perf_counter()
    for _ in range(STEPS):
        split_train_step(parts, adapter, *batch)
    return STEPS / (time.perf_counter() - start)


async def over_grpc(model: BertForSequenceClassification, dtype: str) -> tuple[float, float]:
    service = build_service(copy.deepcopy(model), model_id="bench", front_layers=1, back_layers=1)
    srv = await start_server(service)
    parts = split_model(model, front_layers=1, back_layers=1)
    batch = [data()]
    try:
        async with SplitClient(
            parts, target=f"127.0.0.1:{srv.port}", model_id="bench", wire_dtype=dtype, lora_rank=8
        ) as c:  # type: ignore[arg-type]
            await c.train_step(batch, round_=0, step=0)  # warm-up
            before = c.traffic.bytes_up + c.traffic.bytes_down
            start = time.perf_counter()
            for s in range(1, STEPS + 1):
                await c.train_step(batch, round_=0, step=s)
            rate = STEPS / (time.perf_counter() - start)
            per_sample = (c.traffic.bytes_up + c.traffic.bytes_down - before) / (STEPS * B)
    finally:
        await srv.stop()
    return rate, per_sample


def main() -> None:
    torch.set_num_threads(1)  # 2 shared cores: OpenMP spinning under load distorts timings
    model = make_model()
    print(f"split step, BERT L={LAYERS} H={H}, B={B} T={T}, cut 1|{LAYERS - 2}|1, LoRA r=8")
    print(
        "| wire | in-process steps/s | gRPC steps/s | gRPC/in-process | bytes/sample | "
        "analytic 4·T·H·b + T | ratio |"
    )
    print("|---|---|---|---|---|---|---|")
    for dtype in ("fp32", "bf16", "fp16"):
        # Best of two, measured side by side (shared CPUs make single timings noisy).
        local = max(in_process(copy.deepcopy(model)) for _ in range(2))
        runs = [asyncio.run(over_grpc(copy.deepcopy(model), dtype)) for _ in range(2)]
        rate, per_sample = max(r[0] for r in runs), runs[0][1]
        analytic = 4 * T * H * BYTES[dtype] + T
        print(
            f"| {dtype} | {local:.2f} | {rate:.2f} | {rate / local:.3f} | {per_sample:.0f} | "
            f"{analytic} | {per_sample / analytic:.3f} |"
        )


if __name__ == "__main__":
    main()
