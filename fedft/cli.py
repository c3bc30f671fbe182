"""``fedft`` command line: simulate, privacy plan, and the deployment commands.

Entry points read as recipes: parse arguments -> load and validate the config -> hand over
to the recipe -> report. Bad configuration exits with code 2 before any work starts; a
failed run exits with 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from fedft.config import ALGORITHMS, ConfigError, RunConfig, load_config, load_table
from fedft.console import RUN_LOG_ENV, attach_run_log, setup_console

if TYPE_CHECKING:
    from fedft.data import FederatedData

EXIT_OK, EXIT_FAILED, EXIT_BAD_CONFIG, EXIT_INTERRUPTED = 0, 1, 2, 130


logger = logging.getLogger("fedft.cli")


def _setup_environment(*, verbose: bool) -> None:
    """Offline by default; third-party logs to run.log (``-v``: also the console)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    setup_console(verbose=verbose)


def describe_run(cfg: RunConfig, fed: FederatedData | None = None) -> str:
    """What runs: model, data (its split when ``fed`` is given), clients, algorithm, privacy."""
    from fedft.data.check import describe as describe_data

    m, d, f, a, p = cfg.model, cfg.data, cfg.federation, cfg.adapter, cfg.privacy
    if a.method == "lora":
        ranks = f"ranks {a.ranks}" if a.ranks else f"r={a.rank}"
        adapter = f"LoRA {ranks}, alpha {a.alpha:g}"
    else:
        adapter = f"{a.method} ({a.prompt_tokens} virtual tokens)"
    part = d.partition + (f" alpha={d.alpha:g}" if d.partition == "dirichlet" else "")
    if p.mode == "off":
        privacy = "privacy off"
    else:
        privacy = f"{p.mode}-level DP, epsilon {p.epsilon:g} at delta {p.delta:g}"
    return (
        f"{cfg.name}: model {m.name} ({m.task}, {adapter}); data {d.dataset} ({part})\n"
        f"{f.num_clients} clients, {f.clients_per_round} per round, {f.rounds} rounds x "
        f"{f.local_steps} local steps; aggregation {cfg.aggregation.algorithm}; {privacy}"
        + (f"\ndata: {describe_data(fed)}" if fed is not None else "")
    )


def _load(args: argparse.Namespace) -> RunConfig:
    return load_config(args.config, args.set or ())


def _check_data(cfg: RunConfig) -> FederatedData:
    """Load, split and partition the run's data now, before Ray, a SuperLink or a model.

    Raises:
        DataError: what is wrong with the data for this run, in one line (exit 2).
    """
    from fedft import builders
    from fedft.data.check import check_data, describe

    quiet = logging.getLogger("fedft.data")  # a refusal is one line, not loader chatter
    level = quiet.level
    quiet.setLevel(logging.WARNING)
    try:
        fed = check_data(**builders.data_kwargs(cfg))
    finally:
        quiet.setLevel(level)
    logging.getLogger("fedft").info("data %s: %s", cfg.data.dataset, describe(fed))
    return fed


def _show_partition(cfg: RunConfig) -> FederatedData:
    """Check the run's data (:func:`_check_data`) and print what each client holds."""
    fed = _check_data(cfg)
    print(fed.summary.format(), flush=True)
    return fed


def _cmd_simulate(args: argparse.Namespace) -> int:
    if args.ray_address is not None:  # the flag is federation.ray_address, checked as such
        args.set = [*(args.set or ()), f"federation.ray_address={json.dumps(args.ray_address)}"]
    if args.audit:  # the flag is audit.enabled
        args.set = [*(args.set or ()), "audit.enabled=true"]
    cfg = _load(args)
    from simulations.simulate import check_devices

    check_devices(cfg)  # a GPU the virtual clients cannot reach: exit 2 before any work
    out = Path(args.out or f"runs/{cfg.name}")
    fed = _show_partition(cfg)
    run_log = attach_run_log(out)
    print(describe_run(cfg, fed), file=sys.stderr, flush=True)
    from simulations.simulate import SimulationFailed, simulate

    try:
        summary = simulate(cfg, out, progress=not args.no_progress)
    except SimulationFailed as exc:
        logger.error("%s", exc, exc_info=exc)  # the traceback, for run.log
        print(f"fedft simulate: {exc} (details in {run_log})", file=sys.stderr)
        return EXIT_FAILED
    print(final_summary(cfg, summary, out))
    return EXIT_OK


def final_summary(cfg: RunConfig, summary: dict[str, object], out: Path) -> str:
    """The closing lines: the task metric before -> after, traffic, epsilon, outputs."""
    before, final = summary["before"], summary["after"]
    assert isinstance(before, dict) and isinstance(final, dict)
    metric = "accuracy" if cfg.model.task == "classification" else "loss"
    eps = summary.get("epsilon")
    up, down = summary["bytes_up"], summary["bytes_down"]
    traffic = (  # withheld under user-level DP: the bytes count the secret cohorts
        "traffic not published (user-level DP)"
        if up is None or down is None
        else f"{(float(str(up)) + float(str(down))) / 1e6:.1f} MB exchanged"
    )
    spent = "" if eps is None else f"; epsilon spent {float(str(eps)):.3g}"
    return (
        f"{cfg.name}: test {metric} {before[metric]:.4f} -> {final[metric]:.4f} after "
        f"{summary['rounds']} rounds in {float(str(summary['wall_s'])):.0f} s; "
        f"{traffic}{spent}\n"
        f"outputs in {out}/: metrics.jsonl, summary.json, report.html, adapter/ (PEFT), "
        f"run.log (third-party logs; -v shows them)"
    )


_INSECURE_BANNER = """
!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!
!! --insecure: NO TLS and NO node authentication. Anyone who can reach the port !!
!! can read the model updates and join as a client. Local experiments ONLY.      !!
!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!
"""


def _cmd_server(args: argparse.Namespace) -> int:
    if args.wait_clients is not None:  # a shorthand for the config key
        args.set = [*(args.set or ()), f"federation.client_wait_s={args.wait_clients}"]
    cfg = _load(args)
    _check_data(cfg)  # the server evaluates on the configured dataset's test split
    out = Path(args.out or f"runs/{cfg.name}")
    from server.deploy import DeployError, ServerPlan, ServerTls, run_server

    tls: ServerTls | None = None
    keys: tuple[Path, ...] = ()
    try:
        if args.insecure:
            print(_INSECURE_BANNER, file=sys.stderr)
        elif args.certs is None:
            print(
                "fedft server: TLS needs --certs DIR (make one with `fedft certs DIR`); "
                "--insecure is for local experiments only",
                file=sys.stderr,
            )
            return EXIT_BAD_CONFIG
        else:
            tls = ServerTls.from_dir(Path(args.certs))
            keys = tuple(sorted(Path(args.certs).glob("client-*.pub")))
            keys += tuple(Path(k) for k in args.node_key or ())
        plan = ServerPlan(
            out=out,
            address=args.address,
            tls=tls,
            node_keys=keys,
            resume=args.resume,
            split_address=args.split_address,
        )
        code = run_server(cfg, plan)
    except (DeployError, ValueError) as exc:
        print(f"fedft server: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("fedft server: interrupted; the SuperLink was stopped", file=sys.stderr)
        return EXIT_FAILED
    if code == EXIT_OK:
        print(f"{cfg.name}: run finished; outputs in {out}/")
    else:
        print(f"fedft server: the run failed; logs in {out}/.superlink/", file=sys.stderr)
    return code


def _cmd_client(args: argparse.Namespace) -> int:
    cfg = _load(args)
    if not 0 <= args.partition < cfg.federation.num_clients:
        raise ConfigError(
            f"--partition {args.partition} is not allowed: a client index from 0 to "
            f"{cfg.federation.num_clients - 1} (federation.num_clients)"
        )
    from client.deploy import ClientPlan, run_client, split_tls_files
    from server.deploy import DeployError

    certs = Path(args.certs) if args.certs else None
    split_cert: Path | None = None
    split_key: Path | None = None
    if args.insecure:
        print(_INSECURE_BANNER, file=sys.stderr)
        root, key = None, None
    elif certs is None:
        print(
            "fedft client: TLS needs --certs DIR (with ca.crt and client-<N>.key); "
            "--insecure is for local experiments only",
            file=sys.stderr,
        )
        return EXIT_BAD_CONFIG
    else:
        root = certs / "ca.crt"
        key = Path(args.key) if args.key else certs / f"client-{args.partition}.key"
        split_cert, split_key = split_tls_files(certs, args.partition)  # split mTLS identity
    try:
        plan = ClientPlan(
            partition=args.partition,
            server=args.server,
            root_cert=root,
            node_key=key,
            data_path=Path(args.data) if args.data else None,
            epsilon=args.epsilon,
            delta=args.delta,
            accountant=args.accountant,
            ledger=Path(args.ledger) if args.ledger else None,
            max_wait_s=args.max_wait,
            service=args.service,
            rounds=cfg.federation.rounds,
            split_cert=split_cert,
            split_key=split_key,
            worker=not args.no_worker,
            threads=args.threads,
            warm_config=cfg.to_json(),
        )
        return run_client(plan)
    except (DeployError, ValueError) as exc:
        print(f"fedft client: {exc}", file=sys.stderr)
        return EXIT_FAILED


def _cmd_certs(args: argparse.Namespace) -> int:
    from fedft.certs import write_deployment_certs

    try:
        paths = write_deployment_certs(
            args.out_dir,
            clients=args.clients,
            server_names=args.server_name or (),
            days=args.days,
            overwrite=args.force,
        )
    except (FileExistsError, ValueError) as exc:
        print(f"fedft certs: {exc}", file=sys.stderr)
        return EXIT_FAILED
    d = paths.ca_cert.parent
    from fedft.certs import DEFAULT_SERVER_NAMES

    names = [*DEFAULT_SERVER_NAMES, *(args.server_name or ())]
    host = args.server_name[0] if args.server_name else "localhost"
    if not args.server_name:
        print(
            "fedft certs: no --server-name given: the server certificate covers only "
            f"{', '.join(DEFAULT_SERVER_NAMES)}, so clients on other machines will fail TLS. "
            "For a real deployment run again into a new folder with --server-name "
            "<the host name or IP clients dial>.",
            file=sys.stderr,
        )
    print(f"""wrote a CA, a server certificate and {args.clients} client identities to {d}/
server certificate names (clients must dial one of them): {", ".join(names)}

server (holds ca.crt, server.crt, server.key and every client-<i>.pub):
  fedft server CONFIG.toml --certs {d} --address 0.0.0.0:9092
client i (holds ca.crt and its own client-<i>.key; client-<i>.crt/-tls.key: split mTLS):
  fedft client CONFIG.toml --partition i --certs {d} --server {host}:9092

Keep ca.key off the server; give each client only its own files.""")
    return EXIT_OK


def _cmd_compare(args: argparse.Namespace) -> int:
    # the base config's own algorithm is replaced: compare validates each variant up front
    table = load_table(args.config, args.set or ())
    out = Path(args.out or f"runs/{table.get('name', 'run')}")
    from simulations.compare import compare, config_for, configs_for
    from simulations.simulate import SimulationFailed

    if args.seeds < 1:
        print(f"fedft compare: --seeds must be at least 1, got {args.seeds}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    algorithms = args.algorithms.split(",") if args.algorithms else None
    configs = configs_for(table, algorithms or ALGORITHMS)  # ConfigError: exit 2
    first = next(iter(configs.values()))
    _show_partition(first)  # every variant shares the data keys
    for seed in range(first.seed + 1, first.seed + args.seeds):  # each seed's split, up front
        _check_data(config_for(table, first.aggregation.algorithm, seed=seed))
    try:
        rows = compare(
            table,
            out,
            seeds=args.seeds,
            reuse=args.reuse,
            progress=not args.no_progress,
            **({"algorithms": algorithms} if algorithms else {}),
        )
    except SimulationFailed as exc:
        print(f"fedft compare: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except ValueError as exc:
        print(f"fedft compare: {exc}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    print((out / "compare.md").read_text(), end="")
    print(f"{len(rows)} runs; table, plots and per-run outputs in {out}/")
    return EXIT_OK


def _cmd_privacy_plan(args: argparse.Namespace) -> int:
    cfg = _load(args)
    from fedft import builders
    from fedft.privacy import format_plan, plan, plan_user_level, sample_rate_for
    from fedft.privacy.client import delta_refusal

    fed = _check_data(cfg)  # the run would refuse bad data: so do we

    p, f = cfg.privacy, cfg.federation
    if p.mode == "user":
        print(
            format_plan(
                plan_user_level(
                    epsilon=p.epsilon,
                    delta=p.delta,
                    clients_per_round=f.clients_per_round,
                    num_clients=f.num_clients,
                    rounds=f.rounds,
                    accountant=p.accountant,
                )
            )
        )
        return EXIT_OK
    if p.mode == "off":
        print("privacy.mode = 'off': planning sample-level DP-SGD for this run as if it were on")
    sizes = [len(c) for c in fed.clients]
    per_round = builders.steps_per_round(cfg)  # split: + SFPrompt's local-loss steps
    print(
        f"sample-level DP-SGD, {f.rounds} rounds x {per_round} DP-SGD steps, batch "
        f"{f.batch_size}, {p.accountant.upper()} accountant, delta = {p.delta:g}"
    )
    print("each client calibrates its own noise from its own budget and sampling rate:")
    refused: list[str] = []
    print("| client | examples | q = B/n | budget eps | sigma |")
    print("|---|---|---|---|---|")
    for idx, n in enumerate(sizes):
        dp = builders.client_privacy(cfg, idx)
        q = sample_rate_for(n, f.batch_size)
        sigma = (
            p.noise_multiplier
            or plan(
                epsilon=dp.epsilon,
                delta=p.delta,
                sample_rate=q,
                steps_per_round=per_round,
                rounds=f.rounds,
                accountant=p.accountant,
                alternatives=(),
            ).noise_multiplier
        )
        print(f"| {idx} | {n} | {q:.4f} | {dp.epsilon:g} | {sigma:.3f} |")
        refusal = delta_refusal(delta=p.delta, num_examples=n)
        if refusal is not None:
            refused.append(f"client {idx} will refuse every round: {refusal}")
    for line in refused:
        print(line)
    smallest = sizes.index(min(sizes))
    print(f"\nthe plan of the client with the fewest examples (client {smallest}):")
    print(
        format_plan(
            plan(
                epsilon=builders.client_privacy(cfg, smallest).epsilon,
                delta=p.delta,
                sample_rate=sample_rate_for(sizes[smallest], f.batch_size),
                steps_per_round=per_round,
                rounds=f.rounds,
                accountant=p.accountant,
            )
        )
    )
    return EXIT_OK


def _cmd_config(args: argparse.Namespace) -> int:
    from fedft.config import defaults_toml, json_schema

    if args.config_command == "schema":
        print(json.dumps(json_schema(), indent=2))
    elif args.config_command == "defaults":
        print(defaults_toml(), end="")
    else:  # check
        cfg = _load(args)
        print(json.dumps(cfg.to_dict(), indent=2))
        print(f"fedft config check: {args.config} is valid", file=sys.stderr)
    return EXIT_OK


def _cmd_split_server(args: argparse.Namespace) -> int:
    cfg = _load(args)
    from server.split_runner import serve_forever

    credentials = None
    if args.certs:  # mutual TLS: every session bound to its client certificate
        from server.split_runner import server_credentials_from_dir

        credentials = server_credentials_from_dir(args.certs)
    elif args.insecure:
        print(_INSECURE_BANNER, file=sys.stderr)
    else:
        print(
            "fedft split-server: mutual TLS needs --certs DIR (make one with `fedft certs "
            "DIR`); --insecure serves plaintext with no client identities, for local "
            "experiments only",
            file=sys.stderr,
        )
        return EXIT_BAD_CONFIG
    print(
        f"fedft split-server: serving the body of {cfg.model.name!r} on {args.address} "
        f"({'mutual TLS' if credentials is not None else 'PLAINTEXT'}; Ctrl-C to stop)"
    )
    try:
        serve_forever(
            cfg,
            address=args.address,
            session_timeout_s=args.session_timeout,
            server_credentials=credentials,
        )
    except KeyboardInterrupt:
        pass
    return EXIT_OK


def _cmd_export(args: argparse.Namespace) -> int:
    from fedft.export import ExportError, export_lora, export_merged

    if not args.merged and not args.lora:
        print(
            "fedft export: say what to write: --merged OUT and/or --lora OUT --rank R",
            file=sys.stderr,
        )
        return EXIT_BAD_CONFIG
    if args.rank is not None and not args.lora:
        print(
            "fedft export: --rank R refactors the adapter into one LoRA of rank R; give "
            "it with --lora OUT (the merged model has no rank)",
            file=sys.stderr,
        )
        return EXIT_BAD_CONFIG
    try:
        if args.merged:
            out = export_merged(args.run_dir, args.merged)
            print(f"merged model written to {out}/ (load it with AutoModel*.from_pretrained)")
        if args.lora:
            if args.rank is None:
                raise ExportError("--lora OUT needs --rank R (the rank of the one LoRA)")
            report = export_lora(args.run_dir, args.lora, rank=args.rank)
            worst = max(report.module_errors.items(), key=lambda kv: kv[1])
            print(
                f"rank-{report.rank} LoRA written to {args.lora}/ (PEFT format): relative "
                f"truncation error {report.relative_error:.3g} over all modules, worst "
                f"{worst[1]:.3g} ({worst[0]}); numerical ranks before truncation "
                f"{min(report.module_ranks.values())}..{max(report.module_ranks.values())}"
            )
    except ExportError as exc:
        print(f"fedft export: {exc}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    return EXIT_OK


def _add_config_args(p: argparse.ArgumentParser, *, required: bool = True) -> None:
    p.add_argument("config", nargs=None if required else "?", help="run config (TOML)")
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set federation.rounds=2 (repeatable)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every ``fedft`` subcommand."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=argparse.SUPPRESS,
        help="also show third-party logs and warnings (always kept in OUT/run.log)",
    )
    parser = argparse.ArgumentParser(prog="fedft", description=__doc__, parents=[common])
    sub = parser.add_subparsers(dest="command", required=True)

    sim = sub.add_parser(
        "simulate",
        parents=[common],
        help="run a federation on Flower's Simulation Engine",
        # one usage line, so that a mistake on the command line stays a two-line error
        usage="fedft simulate CONFIG [--set KEY=VALUE] [--out OUT] [options]",
    )
    _add_config_args(sim)
    sim.add_argument("--out", help="output folder (default runs/<name>)")
    sim.add_argument("--no-progress", action="store_true", help="no progress bar")
    sim.add_argument(
        "--ray-address",
        metavar="HOST:PORT",
        help="run the virtual clients on this existing Ray cluster (`ray start --head`); "
        "sets federation.ray_address (docs/ray-cluster.md)",
    )
    sim.add_argument(
        "--audit",
        action="store_true",
        help="after the run, attack its payloads and add the results to summary.json and "
        "report.html (sets audit.enabled)",
    )
    sim.set_defaults(func=_cmd_simulate)

    srv = sub.add_parser(
        "server", parents=[common], help="serve a run: Flower SuperLink + the run's ServerApp"
    )
    _add_config_args(srv)
    srv.add_argument("--out", help="output folder (default runs/<name>)")
    srv.add_argument("--certs", help="folder from `fedft certs` (TLS files, client-*.pub)")
    srv.add_argument("--node-key", action="append", help="another client public key")
    srv.add_argument("--address", default="0.0.0.0:9092", help="HOST:PORT to listen on")
    srv.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint/")
    srv.add_argument("--split-address", help="HOST:PORT the split service binds (split runs)")
    srv.add_argument("--insecure", action="store_true", help="no TLS, no node auth (local)")
    srv.add_argument(
        "--wait-clients",
        type=float,
        metavar="SECONDS",
        help="how long to wait for federation.num_clients clients to connect before the run "
        "fails (default 600; = --set federation.client_wait_s=SECONDS)",
    )
    srv.set_defaults(func=_cmd_server)

    cli = sub.add_parser(
        "client", parents=[common], help="join a run as one edge client (a Flower SuperNode)"
    )
    _add_config_args(cli)
    cli.add_argument("--partition", type=int, required=True, help="client index N")
    cli.add_argument("--data", help="this client's own CSV/JSONL file")
    cli.add_argument("--server", default="127.0.0.1:9092", help="SuperLink HOST:PORT")
    cli.add_argument("--certs", help="folder with ca.crt (and client-N.key)")
    cli.add_argument("--key", help="node private key (default CERTS/client-N.key)")
    cli.add_argument(
        "--epsilon",
        type=float,
        help="this client's own sample-level privacy budget: it then refuses any round that "
        "is not sample-level DP at --delta with --accountant",
    )
    cli.add_argument("--delta", type=float, default=1e-5, help="delta of --epsilon (1e-5)")
    cli.add_argument(
        "--accountant", default="prv", choices=("prv", "rdp"), help="analysis of --epsilon"
    )
    cli.add_argument(
        "--ledger",
        help="file of this client's privacy ledger, kept across runs and restarts "
        "(default $XDG_STATE_HOME/fedft/ledger-client-N.json)",
    )
    cli.add_argument(
        "--max-wait",
        type=float,
        default=600.0,
        help="one-shot mode: exit after this many seconds without the server, or refused "
        "by it (0: never; a service ignores it)",
    )
    cli.add_argument(
        "--service",
        action="store_true",
        help="service mode: when the server finishes or goes away, wait quietly for it (or "
        "its next run) instead of exiting; stops on SIGTERM/SIGINT only",
    )
    cli.add_argument(
        "--threads",
        type=int,
        default=0,
        help="CPU threads of this client's training (default 0: torch's own, every core); "
        "clients sharing one machine should each get their share",
    )
    cli.add_argument(
        "--no-worker",
        action="store_true",
        help="no resident worker: every message loads the model and data again in the "
        "process Flower starts for it (slow; for machines that cannot keep them in memory)",
    )
    cli.add_argument("--insecure", action="store_true", help="no TLS, no node auth (local)")
    cli.set_defaults(func=_cmd_client)

    cmp = sub.add_parser(
        "compare", parents=[common], help="every algorithm on the same split and seed"
    )
    _add_config_args(cmp)
    cmp.add_argument("--out", help="output folder (default runs/<name>)")
    cmp.add_argument("--algorithms", help="comma-separated subset (default: all)")
    cmp.add_argument(
        "--seeds",
        type=int,
        default=1,
        metavar="N",
        help="run every algorithm on N seeds (the config's seed and the N-1 after it; seed s "
        "gives every algorithm the same split) and report mean ± std and a 95%% t-interval "
        "per metric, into OUT/<algorithm>/seed<s>/ (default 1: OUT/<algorithm>/)",
    )
    cmp.add_argument(
        "--reuse",
        action="store_true",
        help="read a run whose folder already holds a finished run of the same config "
        "(summary.json) instead of running it again: continues a stopped compare, or adds "
        "algorithms or seeds to one",
    )
    cmp.add_argument("--no-progress", action="store_true", help="no progress bars")
    cmp.set_defaults(func=_cmd_compare)

    prv = sub.add_parser("privacy", parents=[common], help="privacy budgets")
    prv_sub = prv.add_subparsers(dest="privacy_command", required=True)
    pln = prv_sub.add_parser(
        "plan", parents=[common], help="noise and epsilon per round before anyone trains"
    )
    _add_config_args(pln)
    pln.set_defaults(func=_cmd_privacy_plan)

    spl = sub.add_parser(
        "split-server", parents=[common], help="serve the middle of a split model over gRPC"
    )
    _add_config_args(spl)
    spl.add_argument("--address", default="127.0.0.1:50051", help="HOST:PORT to listen on")
    spl.add_argument(
        "--session-timeout",
        type=float,
        default=60.0,
        help="free a silent client's session after this many seconds",
    )
    spl.add_argument("--certs", help="folder from `fedft certs`: mutual TLS (ca/server)")
    spl.add_argument(
        "--insecure", action="store_true", help="plaintext, no client identities (local)"
    )
    spl.set_defaults(func=_cmd_split_server)

    conf = sub.add_parser(
        "config", parents=[common], help="the run configuration: schema, defaults, check a file"
    )
    cfg_sub = conf.add_subparsers(dest="config_command", required=True)
    cfg_sub.add_parser("schema", help="JSON schema of every key").set_defaults(func=_cmd_config)
    cfg_sub.add_parser("defaults", help="every key, its default and what is allowed (TOML)")
    cfg_sub.choices["defaults"].set_defaults(func=_cmd_config)
    chk = cfg_sub.add_parser("check", help="validate a config (exit 2 if bad); print it resolved")
    _add_config_args(chk)
    chk.set_defaults(func=_cmd_config)

    exp = sub.add_parser(
        "export", parents=[common], help="a finished run for serving: merged model or one LoRA"
    )
    exp.add_argument("run_dir", help="the --out folder of a finished run")
    exp.add_argument("--merged", metavar="OUT", help="write base + adapter merged (HF folder)")
    exp.add_argument("--lora", metavar="OUT", help="write one LoRA of rank --rank (PEFT)")
    exp.add_argument("--rank", type=int, help="the rank of the --lora adapter (SVD)")
    exp.set_defaults(func=_cmd_export)

    crt = sub.add_parser(
        "certs", parents=[common], help="make a CA, server/client certificates and node keys"
    )
    crt.add_argument("out_dir", help="folder to write (created; refuses an existing CA)")
    crt.add_argument("--clients", type=int, default=3, help="number of clients")
    crt.add_argument("--server-name", action="append", help="extra server DNS name or IP")
    crt.add_argument("--days", type=int, default=365, help="validity in days")
    crt.add_argument("--force", action="store_true", help="replace an existing set")
    crt.set_defaults(func=_cmd_certs)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``fedft`` command line; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_environment(verbose=getattr(args, "verbose", False))
    func: Callable[[argparse.Namespace], int] = args.func
    from fedft.data.check import DataError

    try:
        return func(args)
    except ConfigError as exc:
        print(f"fedft: configuration error: {exc}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    except DataError as exc:
        print(f"fedft: data error: {exc}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    except KeyboardInterrupt:
        print(f"fedft {args.command}: interrupted", file=sys.stderr, flush=True)
        # Ray was shut down on the way out; Flower's ServerApp thread cannot be interrupted
        # and would keep the interpreter alive: leave now.
        sys.stdout.flush()
        logging.shutdown()
        os._exit(EXIT_INTERRUPTED)
    except Exception as exc:  # noqa: BLE001 - one line on the console, the traceback in the log
        logger.error("fedft %s failed", args.command, exc_info=exc)
        where = os.environ.get(RUN_LOG_ENV)
        hint = f" (traceback in {where})" if where else " (run with -v for the traceback)"
        print(f"fedft {args.command}: {type(exc).__name__}: {exc}{hint}", file=sys.stderr)
        if getattr(args, "verbose", False):
            raise
        return EXIT_FAILED


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
