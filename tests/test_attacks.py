"""What a curious server recovers from fedft's own payloads, and what the defences leave.

Each attack has a sanity case that must succeed (no defence) and a defended case.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from tiny_models import save_tiny_bert

from fedft.attacks.cut_inversion import (
    RidgeInverter,
    cut_front,
    depth0_candidates,
    nearest_embedding_invert,
    recovery_rate,
)
from fedft.attacks.gradient_inversion import (
    infer_label,
    invert_gradient,
    random_guess_f1,
    token_f1,
    update_gradients,
)
from fedft.privacy.persample import ClippedSum, noisy_mean
from fedft.split import front_forward, split_model
from fedft.split.dx import DxNoise, sample_dx_noise
from fedft.transport import split_wire as wire
from simulations.attacks import lora_label_model

PRIVATE = [
    "the film is a quiet triumph of patience and craft",
    "a clumsy script wastes two fine actors",
    "funny, warm and far smarter than it looks",
    "i left the theatre before the second act ended",
]
PUBLIC = [
    "an old story told with new energy and a great cast",
    "the plot drags but the photography is stunning",
    "nothing here feels earned, least of all the ending",
    "a small gem about family, grief and cooking",
    "the director never decides what the movie is about",
    "loud, long and strangely forgettable",
    "it is the kind of comedy that ages well",
    "every scene with the villain crackles with menace",
]


@pytest.fixture(scope="module")
def tiny() -> tuple[Any, Any]:
    from fedft.models import tiny_model

    return tiny_model("classification", family="bert")


def _encode(tok: Any, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    enc = tok(texts, padding="max_length", truncation=True, max_length=16, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def _as_received(hidden: torch.Tensor, dtype: wire.WireDType = "bf16") -> torch.Tensor:
    """The cut activations after the split wire's encoding (what the server decodes)."""
    enc = wire.encode_tensor("hidden", hidden.detach(), dtype)
    return wire.decode_tensor(enc, max_elements=hidden.numel(), expect_shape=tuple(hidden.shape))


# -- activation inversion at the cut ---------------------------------------------------------


def test_depth0_nearest_embedding_recovers_every_token(tiny: tuple[Any, Any]) -> None:
    model, tok = tiny
    ids, mask = _encode(tok, PRIVATE)
    with torch.no_grad():
        hidden, _ = cut_front(model, 0)(ids, mask)
    got = nearest_embedding_invert(_as_received(hidden), depth0_candidates(model, ids.shape[1]))
    assert recovery_rate(got, ids, mask) >= 0.99
    # control: a server that ignores the payload recovers (almost) nothing
    assert recovery_rate(torch.full_like(ids, 1000), ids, mask) < 0.05


def test_ridge_inverter_reads_the_split_clients_front_output(tiny: tuple[Any, Any]) -> None:
    """Depth 1 through fedft's own split front (front_forward) and the bf16 wire."""
    model, tok = tiny
    parts = split_model(model, front_layers=1, back_layers=0)
    ids, mask = _encode(tok, PRIVATE)
    with torch.no_grad():
        sent = _as_received(front_forward(parts, ids, mask).hidden)
    pub_ids, pub_mask = _encode(tok, PUBLIC)
    words = model.get_input_embeddings().weight
    inverter = RidgeInverter.fit(parts.front, words, pub_ids, pub_mask)
    rate = recovery_rate(inverter.invert(sent), ids, mask)
    assert rate >= 0.5, rate
    # the same inverter on activations of other text recovers the other text, not PRIVATE
    assert recovery_rate(inverter.invert(sent), pub_ids[: len(PRIVATE)], mask) < 0.2


def test_dx_noise_norm_and_direction() -> None:
    gen = torch.Generator().manual_seed(0)
    d, eps = 16, 4.0
    z = sample_dx_noise((20_000, d), eps, generator=gen)
    norms = z.norm(dim=1)
    assert abs(float(norms.mean()) - d / eps) < 0.02 * d / eps  # Gamma(d, 1/eps): mean d/eps
    assert abs(float(norms.var()) - d / eps**2) < 0.1 * d / eps**2  # variance d/eps^2
    unit = z / norms[:, None]
    assert float(unit.mean(dim=0).norm()) < 0.05  # uniform direction
    with pytest.raises(ValueError, match="must be > 0"):
        sample_dx_noise((2, d), 0.0)


def test_dx_noise_lowers_recovery_as_epsilon_shrinks(tiny: tuple[Any, Any]) -> None:
    model, tok = tiny
    ids, mask = _encode(tok, PRIVATE)
    candidates = depth0_candidates(model, ids.shape[1])
    parts = split_model(model, front_layers=1, back_layers=0)
    zero = cut_front(model, 0)
    rates = []
    for eps in (3000.0, 300.0, 30.0):
        zero.privatizer = DxNoise(eps, seed=1)
        with torch.no_grad():
            rates.append(
                recovery_rate(nearest_embedding_invert(zero(ids, mask)[0], candidates), ids, mask)
            )
    assert rates[0] >= 0.9 and rates[2] < 0.2, rates
    assert rates[0] >= rates[1] >= rates[2], rates
    # the split client's own front applies it: the cut output changes with the noise on
    with torch.no_grad():
        clean = front_forward(parts, ids, mask).hidden
        parts.front.privatizer = DxNoise(30.0, seed=2)
        noisy = front_forward(parts, ids, mask).hidden
    parts.front.privatizer = None
    assert not torch.allclose(clean, noisy)


# -- label leakage (iDLG) --------------------------------------------------------------------


def _dp_gradient(
    grad: dict[str, torch.Tensor], sigma: float, gen: torch.Generator
) -> dict[str, torch.Tensor]:
    """fedft's DP-SGD step on a batch of one: clip to C = 1 (the shipped default), add σC noise."""
    summed = ClippedSum(grad, max_grad_norm=1.0)
    summed.add([grad])
    return noisy_mean(summed, noise_multiplier=sigma, expected_batch_size=1, generator=gen)


def test_label_leaks_from_one_update_and_dp_sgd_lowers_the_leak() -> None:
    """iDLG reads every label of an undefended batch-of-one update; DP-SGD at σ = 1 lowers it.

    Lowers, not removes: on these 40 draws the label is still read 0.425 of the time against
    a chance of 0.25 (the 300-trial test below checks that σ = 1 stays above chance + 0.10).
    The bound 0.75 fails if the DP step stopped reducing the leak (it would read 1.0).
    """
    model, params, bias = lora_label_model(num_labels=4)
    gen = torch.Generator().manual_seed(3)
    trials, clean, private = 40, 0, 0
    for _ in range(trials):
        ids = torch.randint(5, 100, (1, 6), generator=gen)
        label = torch.randint(0, 4, (1,), generator=gen)
        grad = update_gradients(
            model, params, attention_mask=torch.ones_like(ids), label=label, input_ids=ids
        )
        clean += infer_label(grad[bias]) == int(label)
        # a plain-SGD update is -lr * gradient: the same rule with sign = -1
        assert infer_label(-0.01 * grad[bias], sign=-1.0) == int(label)
        private += infer_label(_dp_gradient(grad, 1.0, gen)[bias]) == int(label)
    assert clean == trials  # 100 % without a defence
    assert private / trials <= 0.75, private / trials  # DP-SGD at σ = 1, C = 1 lowers it


def test_label_leak_reaches_chance_only_well_above_sigma_one() -> None:
    """#17's target "iDLG near chance with DP at σC >= 1", checked on fedft's DP-SGD step.

    Near chance = at most chance + 0.10 (the margin of the DLG target). Sanity: without a
    defence every label is read. At σ = 1, C = 1 (σC = 1) the label is still read well above
    chance, so σC >= 1 alone does not meet the target; σ = 4 does (4 classes; a separate
    300-trial run, seed 3, read 0.66 / 0.52 / 0.41 / 0.29 / 0.24 at σ = 0.742 / 1 / 2 / 4 / 8).
    """
    model, params, bias = lora_label_model(num_labels=4)
    gen = torch.Generator().manual_seed(29)
    trials, chance = 300, 0.25
    hits = {0.0: 0, 1.0: 0, 4.0: 0}
    for _ in range(trials):
        ids = torch.randint(5, 100, (1, 6), generator=gen)
        label = torch.randint(0, 4, (1,), generator=gen)
        grad = update_gradients(
            model, params, attention_mask=torch.ones_like(ids), label=label, input_ids=ids
        )
        for sigma in hits:
            seen = grad if sigma == 0 else _dp_gradient(grad, sigma, gen)
            hits[sigma] += infer_label(seen[bias]) == int(label)
    rate = {sigma: h / trials for sigma, h in hits.items()}
    assert rate[0.0] == 1.0, rate
    assert rate[1.0] > chance + 0.10, rate  # σC = 1: not near chance
    assert rate[4.0] <= chance + 0.10, rate  # σC = 4: near chance


def test_released_dp_update_of_one_step_hides_the_label_at_sigma_four() -> None:
    """iDLG on what a DP-SGD client releases after one AdamW step (fedft's own loop).

    Sanity: with clipping and no noise every label is read. At σ = 4 the read is near chance
    (0.285 over 200 draws, chance 0.25, ``simulations.attacks --released-trials``); the bound
    chance + 0.20 fails if the client's DP-SGD loop stopped adding its noise.
    """
    from simulations.attacks import released_label_attack

    rows = released_label_attack(trials=16, sigmas=(0.0, 4.0), local_steps=(1,), examples=(1,))
    rate = {r["sigma"]: r["accuracy"] for r in rows}
    assert rate[0.0] == 1.0, rows
    assert rate[4.0] <= 0.25 + 0.20, rows


@pytest.mark.slow
def test_released_dp_update_leaks_the_label_more_over_more_local_steps() -> None:
    """The leak grows with the steps that hold the example; σ must grow with it (≈ √steps).

    One example, the client's own DP-SGD loop (AdamW, lr 5e-4, C = 1), the server reading the
    head bias of before - after. Measured (docs/results.md): at σ = 1 one step gives the label
    0.455 of the time (chance 0.25), 20 steps 1.0; at σ = 16, 20 steps give 0.30. So σC ≥ 1
    hides nothing of a 20-step update, and σ = 16 brings it near chance.
    """
    from simulations.attacks import released_label_attack

    one = released_label_attack(trials=20, sigmas=(1.0,), local_steps=(1,), examples=(1,))
    many = released_label_attack(trials=20, sigmas=(1.0, 16.0), local_steps=(20,), examples=(1,))
    rate = {(r["local_steps"], r["sigma"]): r["accuracy"] for r in one + many}
    assert rate[(1, 1.0)] <= 0.7, rate
    assert rate[(20, 1.0)] >= 0.9, rate  # more steps, same σ: the label is read
    assert rate[(20, 16.0)] <= 0.25 + 0.15, rate  # σ = 16: near chance again


def test_secagg_server_never_holds_one_clients_update() -> None:
    """What SecAggServer takes in: keys, ciphertexts, masked vectors, shares; out: the sum."""
    import inspect

    from fedft.secagg import SecAggClient, SecAggParams, SecAggServer
    from fedft.secagg import protocol as proto

    model, params, bias = lora_label_model(num_labels=4)
    n = 3
    gen = torch.Generator().manual_seed(5)
    vectors = {}
    for i in range(1, n + 1):
        ids = torch.randint(5, 100, (1, 6), generator=gen)
        label = torch.tensor([i % 4])
        grad = update_gradients(
            model, params, attention_mask=torch.ones_like(ids), label=label, input_ids=ids
        )
        vectors[i] = grad[bias].double().numpy()
    p = SecAggParams(num_clients=n, max_dropouts=1, vector_length=4, round_id=1)
    clients = {i: SecAggClient(index=i, params=p) for i in vectors}
    server = SecAggServer(p)
    directory = server.collect_keys([c.advertise_keys() for c in clients.values()])
    routed = server.collect_shares([c.share_keys(directory) for c in clients.values()])
    qualified = server.collect_checks([clients[i].check_shares(routed[i]) for i in clients])
    masked = [clients[i].masked_input(qualified, vectors[i]) for i in clients]
    request = server.collect_masked(masked)
    result = server.collect_unmasking([clients[i].unmask(request) for i in clients])
    # the only client -> server message that carries a vector is MaskedInput: masked bytes
    inbound = {
        name: inspect.signature(getattr(SecAggServer, name)).parameters["messages"].annotation
        for name in (
            "collect_keys",
            "collect_shares",
            "collect_checks",
            "collect_masked",
            "collect_unmasking",
        )
    }
    vector_fields = {
        f.name
        for cls in (
            proto.AdvertiseKeys,
            proto.ShareKeys,
            proto.ShareCheck,
            proto.MaskedInput,
            proto.UnmaskShares,
        )
        for f in dataclasses.fields(cls)
        if "ndarray" in str(f.type) or "Tensor" in str(f.type)
    }
    assert len(inbound) == 5 and not vector_fields
    for m in masked:
        seen = np.frombuffer(m.masked, dtype="<u8").view(np.int64).astype(np.float64)
        plain = np.round(vectors[m.index] * 2.0**p.frac_bits)
        assert np.all(seen != plain)  # not the client's fixed-point vector
    # what the server learns is the sum
    assert np.allclose(result.total, sum(vectors.values()), atol=p.error_bound * 2)


# -- gradient inversion (DLG) ----------------------------------------------------------------


@pytest.mark.slow
def test_gradient_inversion_recovers_tokens_without_dp_not_with_it() -> None:
    model, params, bias = lora_label_model(num_labels=4)
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(5, 100, (1, 4), generator=gen)
    label = torch.tensor([2])
    grad = update_gradients(
        model, params, attention_mask=torch.ones_like(ids), label=label, input_ids=ids
    )
    kw: dict[str, Any] = {"length": 4, "bias_name": bias, "steps": 40, "top_k": 4, "sweeps": 1}
    clean = invert_gradient(model, params, grad, **kw)
    private = invert_gradient(model, params, _dp_gradient(grad, 1.0, gen), **kw)
    f1_clean, f1_dp = token_f1(clean.ids, ids[0]), token_f1(private.ids, ids[0])
    guess = random_guess_f1(ids[0], torch.arange(5, 100), trials=500)
    assert clean.label == 2
    assert f1_clean >= 0.5 and f1_clean > f1_dp + 0.25, (f1_clean, f1_dp)
    assert f1_dp <= guess + 0.25, (f1_dp, guess)


@pytest.mark.slow
def test_gradient_inversion_under_the_shipped_dp_step_is_near_random_guess() -> None:
    """#17's target: DLG token F1 under DP-SGD at the shipped defaults <= random guess + 0.10.

    Measured (docs/results.md): 0.10 on 10 texts (`simulations.attacks`), and 0.17 on these
    3 (seed 23): 0.115 pooled over 13 against a bound of 0.138. So the target holds on
    average, by a thin margin, not for every handful of texts. A 3-text mean moves in steps
    of 0.083, so this test allows random guess + 0.15 and asserts that DP removed most of
    what the attack recovers without it.

    The shipped step: C = privacy.max_grad_norm (1) and client 0's calibrated σ (0.742 with
    the default config at ε = 3), on a batch of one (the attacker's best case). Sanity: the
    same attack on the undefended gradient of the same texts recovers >= half their tokens.
    """
    from simulations.attacks import shipped_dp

    _, sigma, clip, _ = shipped_dp()
    assert clip == 1.0 and 0.5 < sigma < 1.0  # the shipped σC is below 1
    model, params, bias = lora_label_model(num_labels=4)
    gen = torch.Generator().manual_seed(23)
    kw: dict[str, Any] = {"length": 4, "bias_name": bias, "steps": 40, "top_k": 4, "sweeps": 1}
    clean, private, guess = [], [], []
    for t in range(3):
        ids = torch.randint(5, 100, (1, 4), generator=gen)
        label = torch.randint(0, 4, (1,), generator=gen)
        grad = update_gradients(
            model, params, attention_mask=torch.ones_like(ids), label=label, input_ids=ids
        )
        summed = ClippedSum(grad, max_grad_norm=clip)
        summed.add([grad])
        seen = noisy_mean(summed, noise_multiplier=sigma, expected_batch_size=1, generator=gen)
        clean.append(token_f1(invert_gradient(model, params, grad, seed=t, **kw).ids, ids[0]))
        private.append(token_f1(invert_gradient(model, params, seen, seed=t, **kw).ids, ids[0]))
        guess.append(random_guess_f1(ids[0], torch.arange(5, 100), trials=500, seed=t))
    mean = {k: sum(v) / len(v) for k, v in (("clean", clean), ("dp", private), ("g", guess))}
    assert mean["clean"] >= 0.5, mean
    assert mean["dp"] <= mean["g"] + 0.15, mean
    assert mean["dp"] <= mean["clean"] - 0.3, mean


@pytest.mark.slow
def test_adamw_update_under_the_shipped_dp_steps_hides_the_tokens() -> None:
    """DLG on the update a LoRA client sends, 20 AdamW steps (shipped lr 5e-4), under DP-SGD.

    Each step's gradient of the one example is clipped to C = 1 and noised at the shipped
    σ. Sanity: the one-gradient attack on the same texts recovers >= half the tokens.
    Measured (docs/results.md, 3 texts): F1 0.08 under DP against a random guess of 0.05,
    while the label was still read 3 / 3.
    """
    from simulations.attacks import adamw_dlg, shipped_dp

    torch.manual_seed(0)  # dropout in the client's train-mode steps
    sigma = shipped_dp()[1]
    rows = adamw_dlg(trials=2, local_steps=20, lr=5e-4, dlg_steps=40, sigmas=(sigma,))
    by = {r["observed"].split(",")[-1].strip(): r for r in rows}
    gradient, private = by["one gradient"], by[f"DP-SGD sigma={sigma:g} C=1 on each"]
    assert gradient["f1"] >= 0.5, rows
    assert private["f1"] <= private["random_guess_f1"] + 0.15, rows


def test_dx_config_keys_and_refusals() -> None:
    from fedft.config import ConfigError, build_config, json_schema

    props = json_schema()["$defs"]["SplitConfig"]["properties"]
    assert {"privatize", "dx_epsilon"} <= set(props)
    assert build_config({}).split.privatize == "off"
    on = build_config({"adapter": {"method": "split"}, "split": {"privatize": "dx"}})
    assert on.split.privatize == "dx" and on.split.dx_epsilon == 100.0
    with pytest.raises(ConfigError, match="adapter.method = 'split'"):
        build_config({"split": {"privatize": "dx"}})
    with pytest.raises(ConfigError, match="dx_epsilon"):
        build_config({"split": {"dx_epsilon": 0}})
    assert build_config({}).split.cut_noise_std == 0.0
    with pytest.raises(ConfigError, match="cut_noise_std.*adapter.method = 'split'"):
        build_config({"split": {"cut_noise_std": 0.1}})
    with pytest.raises(ConfigError, match="cut_noise_std"):
        build_config({"adapter": {"method": "split"}, "split": {"cut_noise_std": -1.0}})


class _UpRecorder(grpc.aio.ServerInterceptor):
    """A grpc.aio server interceptor keeping every frame the split server receives."""

    def __init__(self) -> None:
        self.up: list[Any] = []

    async def intercept_service(self, continuation: Any, details: Any) -> Any:
        handler = await continuation(details)
        if handler is None or handler.stream_stream is None:
            return handler
        inner = handler.stream_stream

        async def behaviour(requests: Any, context: Any) -> Any:
            async def recorded() -> Any:
                async for f in requests:
                    self.up.append(f)
                    yield f

            async for out in inner(recorded(), context):
                yield out

        return grpc.stream_stream_rpc_method_handler(
            behaviour,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


def split_client_zero(cfg: Any) -> tuple[Any, Any, Any, Any]:
    """(federated data, runtime, client 0's encoded examples, a round start with a 2-token
    prompt) of a split ``cfg`` on the CPU."""
    from fedft import builders
    from fedft.data import build_federated_data
    from fedft.data.encode import encode
    from fedft.training.coordinator import ClientStart
    from fedft.training.runtime import PROMPT, get_runtime, initial_prompt

    fed = build_federated_data(**builders.data_kwargs(cfg))
    runtime = get_runtime(
        **builders.runtime_kwargs(cfg, num_labels=fed.num_labels), device=torch.device("cpu")
    )
    data = encode(fed.clients[0], runtime.tokenizer, task="classification", max_length=16)
    extras = {**runtime.initial_extras, PROMPT: initial_prompt(runtime, num_tokens=2, seed=0)}
    return fed, runtime, data, ClientStart(adapters={}, base_delta={}, extras=extras, rank=1)


def recorded_split_round(
    cfg: Any, runtime: Any, start: Any, data: Any, **knobs: Any
) -> tuple[list[Any], Any]:
    """Client 0's split round (1 step of batch 8, no local-loss phase) against a loopback
    split server: (the frames the server received, the client's update). ``knobs``: the
    wire dtype and the cut defence (``dx_epsilon``, ``cut_noise_std``)."""
    from client.split_round import run_split_round
    from server.split_runner import SplitServerThread, build_split_service

    rec = _UpRecorder()
    with SplitServerThread(build_split_service(cfg), interceptors=[rec]) as server:
        update = run_split_round(
            runtime,
            client_id="0",
            start=start,
            data=data,
            server_address=server.address,
            model_id=cfg.model.name,
            front_layers=1,
            back_layers=1,
            in_flight=1,
            local_loss_steps=0,
            keep_fraction=1.0,
            steps=1,
            batch_size=8,
            lr=0.01,
            seed=0,
            **knobs,
        )
    return rec.up, update


@pytest.mark.slow
def test_split_round_with_dx_sends_what_the_inverter_cannot_read(tmp_path: Any) -> None:
    """The split server's own view (frames through a gRPC interceptor), dx off vs on."""
    from fedft.config import load_config
    from fedft.data.encode import encode

    save_tiny_bert(tmp_path, layers=3, max_positions=64)
    sets = {
        "model.name": f"'{tmp_path}'",
        "data.max_train_examples": "40",
        "data.max_length": "16",
        "data.test_size": "8",
        "data.public_size": "32",
        "federation.num_clients": "1",
        "federation.clients_per_round": "1",
        "federation.device": "'cpu'",
        "adapter.method": "'split'",
        "adapter.prompt_tokens": "2",
        "split.front_layers": "1",
        "split.back_layers": "1",
    }
    cfg = load_config(None, [f"{k}={v}" for k, v in sets.items()])
    fed, runtime, data, start = split_client_zero(cfg)
    model: Any = runtime.model
    front = cut_front(model, 1)
    pub = encode(fed.public, runtime.tokenizer, task="classification", max_length=16)
    inverter = RidgeInverter.fit(
        front, model.get_input_embeddings().weight, pub.input_ids, pub.attention_mask
    )

    def recovered(dx_epsilon: float | None) -> float:
        frames, update = recorded_split_round(
            cfg, runtime, start, data, wire_dtype="bf16", dx_epsilon=dx_epsilon
        )
        assert update.metrics.get("dx_epsilon") == dx_epsilon
        hits = total = 0
        for frame in (f for f in frames if f.kind == "forward"):
            h = wire.decode_tensor(frame.tensor("hidden"), max_elements=10**6)
            m = wire.decode_tensor(
                frame.tensor("attention_mask"), max_elements=10**6, allowed=("uint8",)
            )
            h, m = h[:, 2:], m[:, 2:].long()  # the soft prompt's positions come first
            got = inverter.invert(h)
            for row, mask in zip(got, m, strict=True):  # best-matching training example
                real = mask.bool()
                same = (data.input_ids[:, real] == row[real]).sum(dim=1)
                hits, total = hits + int(same.max()), total + int(real.sum())
        assert total > 0
        return hits / total

    clean, noisy = recovered(None), recovered(1.0)
    assert clean >= 0.5, clean
    assert noisy <= 0.5 * clean, (clean, noisy)
