"""Secure-aggregation round time at 10 and 40 clients, before and after issue 14's checks.

One SecAgg round in process (real X25519 keys, ChaCha20 masks, AEAD-encrypted Shamir
shares; all clients and the server in this process, so the time is the round's total CPU
cost, not a deployment's wall time), with every client answering the unmasking step:

- **before**: the unmasking rebuilt each secret with the subset search the code had before
  issue 14 (interpolate the first t shares, verify, try other t-subsets), and the server
  used the unmasked sum unchecked;
- **after**: Reed-Solomon decoding of the shares (:func:`fedft.secagg.shamir.decode_shares`,
  which on honest shares is one interpolation plus a check of the spare shares) and the
  server's sum bounds (:func:`server.secure_round.check_sum`).

Both run in the same process, interleaved, best of ``repeat``. A second table plays one
client sending wrong values for every share it reveals: before, the round aborted after
the 4,096-subset cap; after, it completes and names the client.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from bench import DOC, Size, md_table, ratio_line, write_section
from fedft.aggregation import get_aggregator
from fedft.secagg import SecAggAbort, SecAggClient, SecAggParams, SecAggServer, UnmaskShares, shamir
from fedft.types import ClientUpdate, LoraFactors
from server.secure_round import check_sum

logger = logging.getLogger(__name__)

#: uploads per client: MiniLM LoRA r=8 on query/value of 6 layers ~ 74k values; 100k here.
D = 100_000
CLIENTS = (10, 40)


def _old_reconstruct_verified(
    shares: Mapping[int, int],
    *,
    threshold: int,
    verify: Callable[[bytes], bool],
    wrong: set[int] | None = None,
) -> bytes:
    """The code before issue 14: t-subsets in order, at most MAX_SUBSETS (the reference)."""
    if len(shares) < threshold:
        raise shamir.ShareError(f"need {threshold} shares, got {len(shares)}")
    items = sorted(shares.items())
    for n_tried, subset in enumerate(itertools.combinations(items, threshold)):
        if n_tried >= shamir.MAX_SUBSETS:
            break
        try:
            secret = shamir.reconstruct(dict(subset))
        except shamir.ShareError:
            continue
        if verify(secret):
            return secret
    raise shamir.ShareError("no subset verifies")


@contextmanager
def _before() -> Iterator[None]:
    real = shamir.reconstruct_verified
    shamir.reconstruct_verified = _old_reconstruct_verified  # type: ignore[assignment]
    try:
        yield
    finally:
        shamir.reconstruct_verified = real  # type: ignore[assignment]


def _tamper(r: UnmaskShares) -> UnmaskShares:
    def bump(shares: Mapping[int, bytes]) -> dict[int, bytes]:
        return {
            u: shamir.encode_share((shamir.decode_share(s) + 1) % shamir.PRIME)
            for u, s in shares.items()
        }

    return UnmaskShares(
        index=r.index, seed_shares=bump(r.seed_shares), key_shares=bump(r.key_shares)
    )


def one_round(
    n: int, d: int, *, checked: bool, liar: int | None = None
) -> tuple[float, float, str]:
    """Seconds for one round of ``n`` clients (t = n/2 + 1), seconds of the server's
    unmasking step (secret reconstruction, mask removal and, after, the sum checks), and
    the outcome."""
    params = SecAggParams(
        num_clients=n, max_dropouts=n - (n // 2 + 1), vector_length=d + 1, round_id=1
    )
    rng = np.random.default_rng(n)
    vectors = {
        i: np.concatenate([rng.standard_normal(d) * 0.01 * 7, [7.0]]) for i in range(1, n + 1)
    }
    template, aggregator = _template(d), get_aggregator("fedit")  # set up before timing
    t0 = time.perf_counter()
    clients = {i: SecAggClient(index=i, params=params) for i in vectors}
    server = SecAggServer(params)
    directory = server.collect_keys([c.advertise_keys() for c in clients.values()])
    routed = server.collect_shares([c.share_keys(directory) for c in clients.values()])
    request = server.collect_masked(
        [c.masked_input(routed[i], vectors[i]) for i, c in clients.items()]
    )
    answers = [clients[i].unmask(request) for i in request.survivors]
    answers = [_tamper(a) if a.index == liar else a for a in answers]
    t_unmask = time.perf_counter()
    try:
        total = server.collect_unmasking(answers)
    except SecAggAbort:
        now = time.perf_counter()
        return now - t0, now - t_unmask, "aborted"
    outcome = "completed"
    if checked:
        problems = check_sum(
            total, template=template, parts="ab", aggregator=aggregator, max_examples=10
        )
        if problems:
            outcome = "refused"
        if total.suspects:
            outcome += f", suspects {list(total.suspects)}"
    now = time.perf_counter()
    return now - t0, now - t_unmask, outcome


def _secret_ms(n: int, *, reps: int) -> tuple[float, float]:
    """Best-of-``reps`` milliseconds to rebuild one verified secret from ``n`` honest
    shares (t = n/2 + 1): before (the subset search's first try) and after (decoding)."""
    secret = bytes(range(32))
    shares = shamir.split(secret, threshold=n // 2 + 1, indices=list(range(1, n + 1)))

    def ok(s: bytes) -> bool:
        return s == secret

    best = {"before": float("inf"), "after": float("inf")}
    for _ in range(reps):
        for name, fn in (
            ("before", _old_reconstruct_verified),
            ("after", shamir.reconstruct_verified),
        ):
            t0 = time.perf_counter()
            fn(shares, threshold=n // 2 + 1, verify=ok)
            best[name] = min(best[name], time.perf_counter() - t0)
    return best["before"] * 1e3, best["after"] * 1e3


def _template(d: int) -> ClientUpdate:
    """A ClientUpdate whose trainables flatten to ``d`` values (one module, r = 1)."""
    a = torch.zeros(1, d // 2)
    b = torch.zeros(d - d // 2, 1)
    return ClientUpdate(
        client_id="t", adapters={"m": LoraFactors(a=a, b=b, scaling=1.0)}, num_examples=1
    )


def run(*, size: Size = "default", doc: Path | None = DOC) -> list[str]:
    """Measure both tables, print the ratio lines, write the section."""
    d = 2_000 if size == "smoke" else D
    clients = (10,) if size == "smoke" else CLIENTS
    repeat = 1 if size == "smoke" else 3
    rows, lines = [], []
    for n in clients:
        before, after = [], []
        for _ in range(repeat):  # interleaved
            with _before():
                before.append(one_round(n, d, checked=False)[:2])
            after.append(one_round(n, d, checked=True)[:2])
        b, a = min(x[0] for x in before), min(x[0] for x in after)
        ub, ua = min(x[1] for x in before), min(x[1] for x in after)
        rows.append([str(n), f"{b:.2f}", f"{a:.2f}", f"{a / b:.2f}", f"{ub:.3f}", f"{ua:.3f}"])
        lines.append(
            ratio_line(
                f"secagg_round_{n}",
                f"round after/before = {a / b:.2f} ({b:.2f} s -> {a:.2f} s); unmask step "
                f"{ub:.3f} s -> {ua:.3f} s",
            )
        )
    secret_rows = []
    for n in clients:
        b_ms, a_ms = _secret_ms(n, reps=5 if size == "smoke" else 40)
        secret_rows.append([str(n), str(n // 2 + 1), f"{b_ms:.2f}", f"{a_ms:.2f}"])
    attack_rows = []
    for n in clients:
        with _before():
            tb, _, ob = one_round(n, d, checked=False, liar=1)
        ta, _, oa = one_round(n, d, checked=True, liar=1)
        attack_rows.append([str(n), f"{tb:.2f} ({ob})", f"{ta:.2f} ({oa})"])
    body = (
        f"One round, all clients and the server in one process, D = {d:,} values per client, "
        f"t = n/2 + 1, every client answers the unmasking; best of {repeat}, before and after "
        "interleaved.\n\n"
        + md_table(
            [
                "clients",
                "round before (s)",
                "round after (s)",
                "after / before",
                "unmask step before (s)",
                "unmask step after (s)",
            ],
            rows,
        )
        + "\n\nRebuilding one secret from n honest shares (the part of the unmasking step "
        "the change replaced), best of the repetitions:\n\n"
        + md_table(["clients n", "threshold t", "before (ms)", "after (ms)"], secret_rows)
        + "\n\nOne client (index 1) sends a wrong value for every share it reveals:\n\n"
        + md_table(["clients", "before: s (outcome)", "after: s (outcome)"], attack_rows)
        + "\n\n"
        + READING
    )
    write_section(
        "secagg_round",
        title="10. Secure aggregation round: before and after the hostile-client checks",
        command=f"python -m bench.secagg_round{' --smoke' if size == 'smoke' else ''}",
        body=body,
        doc=doc if size != "smoke" else None,
    )
    return lines


READING = """**Reading.** The secret table isolates what the change added to an honest round:
decoding checks the n - t spare shares against the interpolated polynomial, where the
subset search interpolated only f(0) from t shares: +0.03 ms (n = 10) and +0.47 ms
(n = 40) per secret, n secrets per round, so about 0.02 s a round at 40 clients. The round
and unmask-step columns are noisy on this shared 2-core machine (three runs of this
benchmark on 2026-12-01 gave round ratios of 1.05-1.16 at 10 clients and 1.10-1.97 at 40);
the unmask step at 40 clients came out slower after in both runs that timed it (0.22 -> 0.47 s and
0.14 -> 0.79 s), more than the secret rebuild explains; that difference is measured, not
explained. Key agreement and ChaCha20 mask expansion (every pair of clients, D values each)
dominate the round and are unchanged. The attack table is where the change shows: the
subset search gave up after 4,096 subsets and aborted the 40-client round; decoding
corrects the liar's shares, completes the round and names the client.
"""


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    run(size="smoke" if args.smoke else "default")
