"""Fault-injecting ClientApps and helpers shared by the Flower fault tests (no tests here).

The ClientApp is ``client.app``'s own, with :class:`FaultMod` (a Flower mod) around its real
handlers; for chosen ``(round, client index)`` pairs the mod injects a fault on the client
side, as a hostile or broken client would:

- ``"raise"``: crash before training (Flower returns an error reply);
- ``"sleep:S"``: answer S seconds late (past ``federation.round_timeout_s``);
- ``"replay"``: send this client's reply of an earlier round again;
- ``"garbage"``: send a reply whose tensor bytes are truncated;
- ``"poison:F"``: scale the update delta by F (a model-poisoning client);
- ``"die:STAGE"``: secure rounds: crash at SecAgg stage STAGE (share, masked, unmask);
- ``"examples:N"``: claim N training examples (a FedAvg weight grab);
- ``"bad-privacy"``: send a privacy record without its ``refused`` flag;
- ``"offset:V:W"``: secure rounds: after masking, add V to every value entry and W to the
  weight entry of the masked vector, in the ring (one client forging the sum).

``drop_rate`` drops each (round, client) with that probability, from a seeded hash (soak).
With ``capture_dir`` every client saves what it started from and what it sent
(safetensors, no pickle) so a test can recompute the aggregate from the survivors.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from fedft.config import RunConfig, load_config
from fedft.types import ClientUpdate, LoraFactors


def tiny_config(model_dir: str, **sets: Any) -> RunConfig:
    """A tiny-BERT run config with ``--set``-style overrides (values as TOML literals)."""
    overrides = [
        f"model.name='{model_dir}'",
        "data.max_train_examples=200",
        "data.test_size=32",
        "data.public_size=16",
        "data.partition='iid'",
        "federation.local_steps=2",
        "federation.batch_size=4",
        "federation.device='cpu'",
        "federation.eval_batch_size=32",
        "adapter.rank=2",
        *[f"{k}={v}" for k, v in sets.items()],
    ]
    return load_config(None, overrides)


def _flat(adapters: dict[str, LoraFactors], extras: dict[str, torch.Tensor]) -> dict[str, Any]:
    out: dict[str, torch.Tensor] = {}
    for mod, f in adapters.items():
        out[f"{mod}::a"] = f.a.contiguous()
        out[f"{mod}::b"] = f.b.contiguous()
        if f.r is not None:
            out[f"{mod}::r"] = f.r.contiguous()
    for k, v in extras.items():
        out[f"extras::{k}"] = v.contiguous()
    return out


def save_update(path: Path, update: ClientUpdate) -> None:
    """Save an update's tensors (safetensors) with n_k and scalings in the metadata."""
    meta = {
        "num_examples": str(update.num_examples),
        "scalings": json.dumps({m: f.scaling for m, f in update.adapters.items()}),
    }
    save_file(_flat(dict(update.adapters), dict(update.extras)), str(path), metadata=meta)


def load_update(path: Path, client_id: str) -> ClientUpdate:
    """Inverse of :func:`save_update`."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata()
    tensors = load_file(str(path))
    scalings = json.loads(meta["scalings"])
    adapters = {
        mod: LoraFactors(
            a=tensors[f"{mod}::a"], b=tensors[f"{mod}::b"], scaling=s, r=tensors.get(f"{mod}::r")
        )
        for mod, s in scalings.items()
    }
    extras = {k.split("::", 1)[1]: v for k, v in tensors.items() if k.startswith("extras::")}
    return ClientUpdate(
        client_id=client_id,
        adapters=adapters,
        num_examples=int(meta["num_examples"]),
        extras=extras,
    )


def dropped(seed: int, rnd: int, idx: int, rate: float) -> bool:
    """Whether client ``idx`` drops in round ``rnd`` (a seeded, reproducible coin)."""
    h = hashlib.sha256(f"{seed}:{rnd}:{idx}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64 < rate


def fault_client_app(
    cfg: RunConfig,
    *,
    plan: dict[str, str] | None = None,
    capture_dir: str | None = None,
    drop_rate: float = 0.0,
    drop_seed: int = 0,
) -> Any:
    """The real ClientApp with a fault-injecting mod; ``plan`` maps "round:index" to a fault."""
    from client.app import make_client_app

    mod = FaultMod(
        cfg, plan=plan or {}, capture_dir=capture_dir, drop_rate=drop_rate, drop_seed=drop_seed
    )
    return make_client_app(cfg, mods=[mod])


class FaultMod:
    """A Flower mod around the real handlers: injects the planned fault, captures tensors."""

    def __init__(
        self,
        cfg: RunConfig,
        *,
        plan: dict[str, str],
        capture_dir: str | None,
        drop_rate: float,
        drop_seed: int,
    ) -> None:
        self.cfg, self.plan, self.capture_dir = cfg, dict(plan), capture_dir
        self.drop_rate, self.drop_seed = drop_rate, drop_seed

    def fault(self, rnd: int, idx: int) -> str:
        """The fault planned for client ``idx`` in round ``rnd`` ("" for none)."""
        if self.drop_rate and dropped(self.drop_seed, rnd, idx, self.drop_rate):
            return "raise"
        return self.plan.get(f"{rnd}:{idx}", "")

    def __call__(self, msg: Any, context: Any, call_next: Any) -> Any:
        kind = msg.metadata.message_type
        if kind == "train":
            return self._train(msg, context, call_next)
        if kind == "train.secagg":
            return self._secagg(msg, context, call_next)
        return call_next(msg, context)

    def _train(self, msg: Any, context: Any, call_next: Any) -> Any:
        from flwr.app import ConfigRecord, Message, RecordDict

        from client.app import client_index
        from fedft.transport import serde

        rnd = int(msg.content[serde.CONFIG]["round"])
        idx = client_index(context)
        fault = self.fault(rnd, idx)
        if fault == "raise":
            raise RuntimeError(f"injected crash of client {idx} in round {rnd}")
        if fault.startswith("sleep:"):
            time.sleep(float(fault.split(":", 1)[1]))
        content = call_next(msg, context).content
        start, update = self._decode(msg.content, content, idx)
        if fault.startswith(("poison:", "examples:")):
            if fault.startswith("poison:"):
                update = _poisoned(start, update, float(fault.split(":", 1)[1]))
            else:  # a FedAvg weight grab
                update = dataclasses.replace(update, num_examples=int(fault.split(":", 1)[1]))
            tag = content[serde.ROUND_RECORD]
            content = serde.update_to_recorddict(update, parts=self._parts())
            content[serde.ROUND_RECORD] = tag
        if fault == "bad-privacy":
            content[serde.PRIVACY_RECORD] = ConfigRecord({"message": "no flag"})
        if self.capture_dir is not None:
            d = Path(self.capture_dir)
            save_update(d / f"start-{rnd}-{idx}.safetensors", start)
            if not fault:
                save_update(d / f"update-{rnd}-{idx}.safetensors", update)
            elif fault.startswith("poison:"):
                save_update(d / f"poison-{rnd}-{idx}.safetensors", update)
        if fault == "replay":
            old = {
                k[len("test.last.") :]: v
                for k, v in context.state.items()
                if k.startswith("test.last.")
            }
            if not old:
                raise RuntimeError("nothing to replay")
            return Message(content=RecordDict(old), reply_to=msg)
        for key, rec in content.items():
            context.state[f"test.last.{key}"] = rec
        if fault == "garbage":
            arrays = content[serde.ADAPTERS]
            key = next(iter(arrays))
            arr = arrays[key]
            arr.data = arr.data[: len(arr.data) // 2]  # truncated tensor bytes
        return Message(content=content, reply_to=msg)

    def _parts(self) -> Any:
        from fedft.aggregation import AGGREGATORS

        return AGGREGATORS[self.cfg.aggregation.algorithm].trainable

    def _decode(self, start_content: Any, content: Any, idx: int) -> tuple[ClientUpdate, Any]:
        """What the client started from and what it sent, as ClientUpdates."""
        from fedft.transport import serde

        adapters, _, extras, _ = serde.start_from_recorddict(start_content)
        update = serde.update_from_recorddict(
            content, client_id=str(idx), parts=self._parts(), reference=adapters
        )
        start = ClientUpdate(client_id="start", adapters=adapters, num_examples=1, extras=extras)
        return start, update

    def _secagg(self, msg: Any, context: Any, call_next: Any) -> Any:
        from client.app import client_index
        from client.secure_round import STATE_KEY
        from fedft.transport import secagg_serde as ss

        stage = ss.stage_of(msg.content)
        if stage == "advertise":
            rnd = int(msg.content[ss.RECORD]["round_id"])
        else:
            rnd = ss.round_of(msg.content)
        idx = client_index(context)
        fault = self.fault(rnd, idx)
        if fault == "raise" and stage == "advertise":
            raise RuntimeError(f"injected crash of client {idx} in round {rnd}")
        if fault == f"die:{stage}":
            raise RuntimeError(f"injected crash of client {idx} at secagg stage {stage}")
        if stage == "share" and fault == "bad-dealer":
            reply = _dealing_badly(lambda: call_next(msg, context))
        else:
            reply = call_next(msg, context)
        if stage == "unmask" and fault == "lie-unmask":
            _lie_at_unmask(reply.content[ss.RECORD])
        if stage == "masked" and fault.startswith("offset:"):
            _offset_masked(reply.content[ss.RECORD], fault)
        if self.capture_dir is None:
            return reply
        d = Path(self.capture_dir)
        if stage == "advertise" and STATE_KEY in context.state:
            from fedft.transport import serde

            start, _, start_extras, _ = serde.start_from_recorddict(msg.content)
            save_update(
                d / f"start-{rnd}-{idx}.safetensors",
                ClientUpdate(
                    client_id="start", adapters=start, num_examples=1, extras=start_extras
                ),
            )
            _, vector = ss.client_state_from_record(context.state[STATE_KEY])
            save_file(
                {"vector": torch.from_numpy(vector.copy())}, str(d / f"vector-{rnd}-{idx}.st")
            )
        if stage == "masked":
            raw = reply.content[ss.RECORD]["masked"]
            Path(d, f"masked-{rnd}-{idx}.bin").write_bytes(raw)
        return reply


def _offset_masked(rec: Any, fault: str) -> None:
    """Add V to every value entry and W to the weight entry of a masked vector (in the ring)."""
    import numpy as np

    value, weight = (float(x) for x in fault.split(":")[1:])
    masked = np.frombuffer(rec["masked"], dtype="<u8").copy()
    ring = 1 << 64
    scale = 2.0**24  # the server's frac_bits
    masked[:-1] += np.uint64(round(value * scale) % ring)
    masked[-1:] += np.uint64(round(weight * scale) % ring)
    rec["masked"] = masked.astype("<u8").tobytes()


def _poisoned(start: ClientUpdate, update: ClientUpdate, factor: float) -> ClientUpdate:
    """start + factor x (update - start): a model-poisoning client's update."""
    adapters = {
        m: LoraFactors(
            a=start.adapters[m].a + factor * (f.a - start.adapters[m].a),
            b=start.adapters[m].b + factor * (f.b - start.adapters[m].b),
            scaling=f.scaling,
            r=f.r,
        )
        for m, f in update.adapters.items()
    }
    extras = {k: start.extras[k] + factor * (v - start.extras[k]) for k, v in update.extras.items()}
    return ClientUpdate(
        client_id=update.client_id,
        adapters=adapters,
        num_examples=update.num_examples,
        metrics=update.metrics,
        extras=extras,
    )


def _dealing_badly(call: Any) -> Any:
    """Run ``call`` with this process's Shamir dealing handing out shares off the polynomial
    (each share + an unrelated offset; commitments, where the protocol has them, unchanged)."""
    from fedft.secagg import shamir

    def off(shares: dict[int, int]) -> dict[int, int]:
        return {i: (v + 0x5EED_0000_0001 * (i + 7)) % shamir.PRIME for i, v in shares.items()}

    saved = {name: getattr(shamir, name) for name in ("split", "deal") if hasattr(shamir, name)}
    if "deal" in saved:
        real_deal = saved["deal"]
        shamir.deal = functools.partial(_deal_off, real_deal, off)  # type: ignore[attr-defined]
    else:
        real_split = saved["split"]
        shamir.split = lambda *a, **k: off(real_split(*a, **k))  # type: ignore[assignment]
    try:
        return call()
    finally:
        for name, fn in saved.items():
            setattr(shamir, name, fn)


def _deal_off(real: Any, off: Any, *args: Any, **kwargs: Any) -> Any:
    shares, commitments = real(*args, **kwargs)
    return off(shares), commitments


def _lie_at_unmask(rec: Any) -> None:
    """Add one to every share value of an unmask reply (still in the field)."""
    from fedft.secagg import shamir

    for key in ("seed_shares", "key_shares"):
        rec[key] = [
            shamir.encode_share((shamir.decode_share(b) + 1) % shamir.PRIME) for b in rec[key]
        ]


def run_sim(cfg: RunConfig, out: Path, client_app: Any) -> dict[str, Any]:
    """Run ``cfg`` on the Simulation Engine with ``client_app``; return the summary."""
    import ray
    from flwr.simulation import run_simulation

    from server.app import make_server_app
    from simulations.simulate import backend_config

    errors: list[BaseException] = []
    server_app = make_server_app(cfg, out_dir=out, progress=False, on_error=errors.append)
    try:
        run_simulation(
            server_app=server_app,
            client_app=client_app,
            num_supernodes=cfg.federation.num_clients,
            backend_config=backend_config(cfg),  # type: ignore[arg-type]
        )
    finally:
        if ray.is_initialized():
            ray.shutdown()
    if errors:
        raise errors[0]
    return dict(json.loads((out / "summary.json").read_text())["final"])


def metrics_rows(out: Path) -> list[dict[str, Any]]:
    """The run's metrics.jsonl rows."""
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
