"""Sample-level DP-SGD across the split: exactness against per-example autograd through the
unsplit model, the server adapter's clipping, noise once per step, refusals, accounting."""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import math

import pytest
import torch
from test_split_support import HIDDEN, batch, tiny_bert, tiny_llama

from client.split_client import SplitClient, SplitError
from fedft.privacy import per_sample_loss
from fedft.privacy.persample import ClippedSum, noisy_mean, poisson_sample, side_noise_multiplier
from fedft.prompt import PromptTunedModel, SoftPrompt, set_prompt
from fedft.split import BodyAdapter, split_model
from fedft.split.dp import client_trainables, shortcut_per_sample
from fedft.transport import split_wire as wire
from server import split_service
from server.split_service import build_service, start_server

MODEL_ID = "tiny"
PROMPT = 3
FAMILIES = {"bert": tiny_bert, "llama": tiny_llama}


def _trainable(model: torch.nn.Module, family: str) -> None:
    """Freeze everything, then train parts of every client-side piece: front block, back
    block, head (BERT) / tied embedding = LM head (Llama)."""
    for p in model.parameters():
        p.requires_grad_(False)
    names = {
        "bert": (
            "bert.encoder.layer.0.attention.self.query.weight",  # front block
            "bert.encoder.layer.3.output.dense.weight",  # back block
            "bert.pooler.dense.weight",
            "classifier.weight",
            "classifier.bias",
        ),
        "llama": (
            "model.layers.0.self_attn.q_proj.weight",  # front block
            "model.layers.3.mlp.down_proj.weight",  # back block
            "model.embed_tokens.weight",  # tied: used by the front and the back
        ),
    }[family]
    params = dict(model.named_parameters())
    for n in names:
        params[n].requires_grad_(True)


def _oracle(model, family, ids, mask, labels, prompt, clip_norm):  # type: ignore[no-untyped-def]
    """Per-example autograd through the unsplit prompted model, clipped jointly, summed.

    Returns:
        ({client name: clipped sum}, per-example norms).
    """
    wrapped = PromptTunedModel(copy.deepcopy(model), num_tokens=PROMPT, seed=0)
    set_prompt(wrapped, prompt)
    _trainable(wrapped.model, family)
    params = {
        (n[len("model.") :] if n.startswith("model.") else n): p
        for n, p in wrapped.named_parameters()
        if p.requires_grad
    }
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    norms = []
    for i in range(ids.shape[0]):
        out = wrapped(ids[i : i + 1], mask[i : i + 1])
        loss = per_sample_loss(out.logits, labels[i : i + 1])[0]  # the non-split DP loss
        grads = torch.autograd.grad(loss, list(params.values()))
        norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
        norms.append(float(norm))
        factor = min(1.0, clip_norm / (float(norm) + 1e-6))
        for n, g in zip(params, grads, strict=True):
            total[n] += factor * g
    return total, norms


def _client_parts(model, family, prompt):  # type: ignore[no-untyped-def]
    parts = split_model(model, front_layers=1, back_layers=1)
    _trainable(model, family)
    soft = SoftPrompt(PROMPT, HIDDEN)
    set_prompt(soft, prompt)
    parts.front.prompt = soft
    return parts


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_noise_free_private_step_over_grpc_equals_per_example_unsplit(family: str) -> None:
    """One noise-free DP step through the real split server (fp32 wire, 2 micro-batches)
    equals per-example autograd through the unsplit model with joint clipping, and the
    server's clipped adapter sum equals per-example autograd of the adapter."""
    model = FAMILIES[family](layers=4)
    server_model = copy.deepcopy(model)
    prompt = torch.randn(PROMPT, HIDDEN) * 0.02
    mbs = [batch(family, b=3, seed=s) for s in (0, 1)]
    ids = torch.cat([m[0] for m in mbs])
    mask = torch.cat([m[1] for m in mbs])
    labels = torch.cat([m[2] for m in mbs])

    _, norms = _oracle(model, family, ids, mask, labels, prompt, 1e9)
    clip_norm = sorted(norms)[len(norms) // 2]  # about half the examples get clipped
    want, _ = _oracle(model, family, ids, mask, labels, prompt, clip_norm)
    assert any(n > clip_norm * 1.01 for n in norms) and any(n < clip_norm for n in norms)

    parts = _client_parts(model, family, prompt)
    params = client_trainables(parts)
    assert set(params) == set(want)
    released: list[dict[str, torch.Tensor]] = []
    orig = split_service._ServerDP.release

    def spy(self, adapter):  # type: ignore[no-untyped-def]
        orig(self, adapter)  # sets .grad to the noisy mean; σ = 0 here: the clipped mean
        released.append({n: p.grad.clone() for n, p in adapter.named_parameters()})

    server_dp = wire.ServerDP(noise_multiplier=0.0, max_grad_norm=0.05, expected_batch_size=6)

    async def run() -> float:
        service = build_service(server_model, model_id=MODEL_ID, front_layers=1, back_layers=1)
        srv = await start_server(service)
        try:
            client = SplitClient(
                parts,
                target=f"127.0.0.1:{srv.port}",
                model_id=MODEL_ID,
                wire_dtype="fp32",
                lora_rank=4,
                seed=7,
                server_dp=server_dp,
            )
            async with client:
                clip = ClippedSum(params, max_grad_norm=clip_norm)
                loss = await client.train_step(mbs, round_=0, step=0, clip=clip)
                assert clip.samples == 6
                got = noisy_mean(clip, noise_multiplier=0.0, expected_batch_size=6, generator=None)
                for name, g in want.items():
                    torch.testing.assert_close(got[name], g / 6, atol=1e-5, rtol=0)
                    err = float((got[name] - g / 6).abs().max())
                    assert err <= 1e-5, (name, err)
                assert all(p.grad is None for p in params.values())  # nothing left behind
                return loss
        finally:
            split_service._ServerDP.release = orig  # type: ignore[method-assign]
            await srv.stop()

    split_service._ServerDP.release = spy  # type: ignore[method-assign]
    loss = asyncio.run(run())
    assert math.isfinite(loss)

    # Server side: per-example adapter gradients by autograd through the in-process split
    # (a batch of one each), clipped to the server's C, summed, divided by B.
    ref_model = copy.deepcopy(server_model)
    ref = split_model(ref_model, front_layers=1, back_layers=1)
    for p in ref_model.parameters():
        p.requires_grad_(False)
    ref.front.prompt = SoftPrompt(PROMPT, HIDDEN)
    set_prompt(ref.front.prompt, prompt)
    adapter = BodyAdapter(ref.body, rank=4, alpha=16.0, seed=7)
    total = {n: torch.zeros_like(p) for n, p in adapter.named_parameters()}
    for i in range(6):
        adapter.zero_grad(set_to_none=True)
        h, m = ref.front(ids[i : i + 1], mask[i : i + 1])
        _, logits = ref.back(adapter.run(ref.body, h, m), m, None)
        per_sample_loss(logits, labels[i : i + 1])[0].backward()
        g = {n: p.grad for n, p in adapter.named_parameters()}
        norm = math.sqrt(sum(float(t.pow(2).sum()) for t in g.values() if t is not None))
        factor = min(1.0, 0.05 / (norm + 1e-6))
        for n, t in g.items():
            if t is not None:
                total[n] += factor * t
    assert len(released) == 1
    assert any(float(t.abs().max()) > 0 for t in released[0].values())
    for n, t in total.items():
        torch.testing.assert_close(released[0][n], t / 6, atol=1e-6, rtol=1e-4)


def test_shortcut_per_sample_equals_per_example_autograd() -> None:
    model = tiny_bert(layers=4)
    prompt = torch.randn(PROMPT, HIDDEN) * 0.02
    parts = _client_parts(model, "bert", prompt)
    ids, mask, labels = batch("bert", b=4, seed=5)
    params = client_trainables(parts)
    losses, grads = shortcut_per_sample(parts, params, ids, mask, labels)
    for i in range(4):
        h, m = parts.front(ids[i : i + 1], mask[i : i + 1])
        loss, _ = parts.back(h, m, labels[i : i + 1])
        assert loss is not None
        ref = torch.autograd.grad(loss, list(params.values()))
        assert abs(float(losses[i]) - float(loss.detach())) <= 1e-6
        for n, r in zip(params, ref, strict=True):
            g = grads[i][n]
            assert g is not None
            torch.testing.assert_close(g, r, atol=1e-6, rtol=1e-5)


def test_clipped_sum_bounds_every_example_and_noise_has_sigma_c() -> None:
    params = {"a": torch.zeros(3), "b": torch.zeros(2, 2)}
    clip = ClippedSum(params, max_grad_norm=1.0)
    big = {"a": torch.tensor([3.0, 0.0, 0.0]), "b": torch.full((2, 2), 2.0)}  # norm 5
    small = {"a": torch.tensor([0.1, 0.0, 0.0])}
    norms = clip.add([big, small])
    assert torch.allclose(norms, torch.tensor([5.0, 0.1]))
    assert clip.samples == 2 and clip.clipped == 1
    torch.testing.assert_close(
        clip.total["a"], torch.tensor([0.6 + 0.1, 0.0, 0.0]), atol=1e-6, rtol=0
    )
    torch.testing.assert_close(clip.total["b"], torch.full((2, 2), 0.4), atol=1e-6, rtol=0)
    with pytest.raises(KeyError):
        clip.add([{"c": torch.zeros(1)}])

    wide = ClippedSum({"w": torch.zeros(200_000)}, max_grad_norm=0.5)
    gen = torch.Generator().manual_seed(0)
    out = noisy_mean(wide, noise_multiplier=2.0, expected_batch_size=4, generator=gen)["w"]
    assert abs(float(out.std()) - 2.0 * 0.5 / 4) < 0.01 * 0.25
    assert abs(float(out.mean())) < 0.01
    assert side_noise_multiplier(1.5, 2) == pytest.approx(1.5 * math.sqrt(2))


def test_server_dp_refused_without_adapter_and_unconfirmed_dp_refused() -> None:
    model = tiny_bert(layers=4)
    parts = split_model(copy.deepcopy(model), front_layers=1, back_layers=1)
    dp = wire.ServerDP(noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=4)

    async def run() -> None:
        service = build_service(model, model_id=MODEL_ID, front_layers=1, back_layers=1)
        srv = await start_server(service)
        try:
            c = SplitClient(parts, target=f"127.0.0.1:{srv.port}", model_id=MODEL_ID, server_dp=dp)
            with pytest.raises(Exception, match="lora_rank"):
                await c.open()
            await c.channel.close()
        finally:
            await srv.stop()

        # A server that ignores server_dp (an older one) must not be trusted with it.
        old = build_service(model, model_id=MODEL_ID, front_layers=1, back_layers=1)
        real = old.open_session

        async def ignore_dp(req, context):  # type: ignore[no-untyped-def]
            return await real(dataclasses.replace(req, server_dp=None), context)

        old.open_session = ignore_dp  # type: ignore[method-assign]
        srv = await start_server(old)
        try:
            c = SplitClient(
                parts, target=f"127.0.0.1:{srv.port}", model_id=MODEL_ID, lora_rank=2, server_dp=dp
            )
            with pytest.raises(SplitError, match="DP_REFUSED"):
                await c.open()
            await c.channel.close()
            assert old.stats()["sessions"] == 0  # the refused session was closed
        finally:
            await srv.stop()

    asyncio.run(run())


def test_server_dp_adds_noise_once_per_step_even_for_an_empty_batch() -> None:
    model = tiny_bert(layers=4)
    parts = split_model(copy.deepcopy(model), front_layers=1, back_layers=1)
    for p in parts.front.parameters():
        p.requires_grad_(False)
    parts.front.prompt = SoftPrompt(PROMPT, HIDDEN)
    dp = wire.ServerDP(noise_multiplier=3.0, max_grad_norm=1.0, expected_batch_size=4)
    released: list[dict[str, torch.Tensor]] = []
    orig = split_service._ServerDP.release

    def spy(self, adapter):  # type: ignore[no-untyped-def]
        orig(self, adapter)
        released.append({n: p.grad.clone() for n, p in adapter.named_parameters()})

    async def run() -> None:
        srv = await start_server(
            build_service(model, model_id=MODEL_ID, front_layers=1, back_layers=1)
        )
        try:
            c = SplitClient(
                parts,
                target=f"127.0.0.1:{srv.port}",
                model_id=MODEL_ID,
                lora_rank=2,
                server_dp=dp,
            )
            async with c:
                params = client_trainables(parts)
                await c.train_step([], round_=0, step=0, clip=ClippedSum(params, max_grad_norm=1))
                await c.train_step(
                    [batch("bert", b=2)], round_=0, step=1, clip=ClippedSum(params, max_grad_norm=1)
                )
        finally:
            split_service._ServerDP.release = orig  # type: ignore[method-assign]
            await srv.stop()

    split_service._ServerDP.release = spy  # type: ignore[method-assign]
    asyncio.run(run())
    assert len(released) == 2  # the empty Poisson batch released noise too
    for grads in released:
        flat = torch.cat([g.flatten() for g in grads.values()])
        # std σC/B = 0.75 per coordinate (the clipped signal adds at most C/B = 0.25 in norm)
        assert abs(float(flat.std()) - 0.75) < 0.1
    first, second = (torch.cat([g.flatten() for g in r.values()]) for r in released)
    assert not torch.equal(first, second)  # fresh noise every step


def test_clipped_sum_at_its_edges_and_refusals_name_the_setting() -> None:
    """An empty Poisson batch, a missing gradient, ‖g‖ = C, a tiny g, half-precision params."""
    with pytest.raises(ValueError, match=r"^max_grad_norm = 0: must be > 0$"):
        ClippedSum({"w": torch.zeros(2)}, max_grad_norm=0)
    with pytest.raises(ValueError, match=r"^parts = 0: at least one clipped part$"):
        side_noise_multiplier(1.5, 0)
    assert side_noise_multiplier(1.5, 1) == 1.5  # the client's side alone: σ as accounted

    clip = ClippedSum({"w": torch.zeros(2), "v": torch.zeros(3)}, max_grad_norm=5.0)
    empty = clip.add([])  # an empty Poisson batch is a step too
    assert empty.shape == (0,) and clip.samples == 0
    # an example without any gradient counts as a zero gradient, not an error
    assert clip.add([{"w": None}, {}]).tolist() == [0.0, 0.0] and clip.samples == 2
    # a gradient naming a parameter the sum does not hold: refused before anything is added
    with pytest.raises(KeyError, match=r"gradients for unknown parameters \['x'\]"):
        clip.add([{"w": torch.ones(2), "x": torch.ones(1)}])
    assert clip.samples == 2 and not any(t.any() for t in clip.total.values())
    # norm exactly C is not clipped (the count the client keeps to itself)
    assert clip.add([{"w": torch.tensor([3.0, 4.0])}]).tolist() == [5.0] and clip.clipped == 0
    assert clip.add([{"w": torch.tensor([6.0, 8.0])}]).tolist() == [10.0] and clip.clipped == 1
    # a gradient far below the 1e-6 guard is added as it is (factor 1, never flipped)
    tiny = torch.tensor([0.0, 3e-7, 4e-7])
    clip.add([{"v": tiny}])
    assert torch.equal(clip.total["v"], tiny)

    # half-precision parameters: the sum accumulates in float32 (in bfloat16, 0.01 added 1024
    # times stalls near 4)
    half = ClippedSum({"w": torch.zeros(1, dtype=torch.bfloat16)}, max_grad_norm=1.0)
    g = torch.full((1,), 0.01, dtype=torch.bfloat16)
    half.add([{"w": g}] * 1024)
    assert half.total["w"].dtype == torch.float32
    assert float(half.total["w"]) == pytest.approx(1024 * float(g), rel=1e-4)


def test_noisy_mean_refuses_bad_settings_and_draws_its_noise_from_the_generator() -> None:
    summed = ClippedSum({"w": torch.zeros(4), "b": torch.zeros(2, 2)}, max_grad_norm=0.5)
    summed.add([{"w": torch.tensor([1.0, 0.0, 0.0, 0.0])}])  # clipped to norm 0.5
    with pytest.raises(
        ValueError, match=r"^noise_multiplier = -0.5 \(>= 0\), expected_batch_size = 4 \(>= 1\)$"
    ):
        noisy_mean(summed, noise_multiplier=-0.5, expected_batch_size=4, generator=None)
    with pytest.raises(ValueError, match=r"expected_batch_size = 0 \(>= 1\)$"):
        noisy_mean(summed, noise_multiplier=1.0, expected_batch_size=0, generator=None)
    # B = 1 is a batch: the clipped sum itself
    one = noisy_mean(summed, noise_multiplier=0.0, expected_batch_size=1, generator=None)
    torch.testing.assert_close(one["w"], torch.tensor([0.5, 0.0, 0.0, 0.0]), atol=1e-6, rtol=0)
    assert torch.equal(one["b"], torch.zeros(2, 2))
    # the noise is N(0, σ²C²) from the generator given: the same seed gives the same step
    # (reproducible simulations), and it is added to the sum, coordinate by coordinate
    sigma, b = 2.0, 4
    got = noisy_mean(
        summed,
        noise_multiplier=sigma,
        expected_batch_size=b,
        generator=torch.Generator().manual_seed(11),
    )
    again = noisy_mean(
        summed,
        noise_multiplier=sigma,
        expected_batch_size=b,
        generator=torch.Generator().manual_seed(11),
    )
    assert all(torch.equal(got[k], again[k]) for k in got)
    gen = torch.Generator().manual_seed(11)
    for name, total in summed.total.items():  # the parameters in order, one draw each
        z = torch.normal(0.0, 1.0, size=total.shape, generator=gen)
        torch.testing.assert_close(got[name], (total + sigma * 0.5 * z) / b, atol=1e-6, rtol=0)


def test_poisson_batches_come_from_the_generator_given() -> None:
    """A client's batches are reproducible from its seed; each example is an independent coin."""

    def draw(seed: int, n: int = 2000, q: float = 0.25) -> torch.Tensor:
        return poisson_sample(n, q, torch.Generator().manual_seed(seed))

    a = draw(3)
    assert torch.equal(a, draw(3)) and not torch.equal(a, draw(4))
    assert a.dtype == torch.int64 and bool((a[1:] > a[:-1]).all())
    assert abs(len(a) - 500) < 5 * math.sqrt(2000 * 0.25 * 0.75)
    assert torch.equal(draw(0, n=40, q=1.0), torch.arange(40))
