"""The ``oclaw`` command line."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from time import perf_counter_ns
from typing import Any

from handler import cost_command, keys, model_commands

_T0 = perf_counter_ns()


def _serve(args: argparse.Namespace) -> int:
    from engine.config import Settings, server_port

    overrides = {"model_repository": args.model_repository} if args.model_repository else {}
    settings = Settings.from_env(**overrides)
    port = args.port if args.port is not None else server_port()
    if settings.model_repository.startswith("s3:"):
        from engine.errors import OclawError
        from engine.repository.s3 import parse_s3_uri

        try:
            parse_s3_uri(settings.model_repository)  # fetched at start-up into OCLAW_MODEL_CACHE
        except OclawError as exc:
            print(f"oclaw: {exc.message}", file=sys.stderr)
            return 2
    elif not os.path.isdir(settings.model_repository):
        print(f"oclaw: model repository {settings.model_repository!r} is not a directory", file=sys.stderr)
        return 2
    from engine import auth

    if (why := keys.refusal(settings, args.host)) is not None:
        print(f"oclaw: {why}", file=sys.stderr)
        return 2
    ring = auth.keys_for(
        settings.api_keys, settings.auth, settings.api_keys_ttl_s
    )  # a bad key file is named now, before any model loads
    from handler.server import bind, serve

    where = f"[{args.host}]:{port}" if ":" in args.host else f"{args.host}:{port}"
    try:
        sock = bind(args.host, port)  # before any model loads: a taken port fails now, not once all are warm
    except OSError as exc:
        print(
            f"oclaw: cannot listen on {where}: {exc.strerror or exc} (choose another with --port or PORT)",
            file=sys.stderr,
        )
        return 3
    from engine.logs import configure

    configure(settings.log_level, settings.log_format, root=True)  # uvicorn's lines too: one format, one stream
    import logging

    if settings.auth == "none":
        logging.getLogger("oclaw.auth").warning(
            "OCLAW_AUTH=none: access control is OFF; anyone who reaches %s may infer, load and unload models", where
        )
    elif ring is not None:
        logging.getLogger("oclaw.auth").info("API keys: %d from %s", len(ring), settings.api_keys)
    return serve(settings, sock=sock, started_ns=_T0)


def _lambda_invoke(args: argparse.Namespace) -> int:
    from engine.config import Settings
    from handler.local_lambda import LocalLambda

    events = []
    for path in args.events:
        try:
            with open(path, "rb") as fh:
                events.append(json.loads(fh.read()))
        except (OSError, ValueError) as exc:
            print(f"oclaw: {path}: {exc}", file=sys.stderr)
            return 2
    env = dict(args.env)
    if args.model_repository:
        env["OCLAW_MODEL_REPOSITORY"] = args.model_repository
    Settings.from_env({**os.environ, **env})  # the function's settings: a bad one is named here, before INIT
    fn = LocalLambda(
        args.handler,
        env=env,
        memory_mb=args.memory,
        timeout_s=args.timeout,
        snap_start=args.snap_start,
        log=sys.stderr.buffer,
    )
    with fn:
        try:
            fn.wait_init()
        except RuntimeError as exc:
            print(f"oclaw: {exc}", file=sys.stderr)
            return 1
        failed = []
        for _ in range(args.repeat):
            for path, event in zip(args.events, events, strict=True):
                result = fn.invoke(event)
                if result.error is not None:
                    print(json.dumps(result.error))
                else:
                    print((result.payload or b"").decode(errors="replace"))
                print(result.report_line(), file=sys.stderr)
                reason = _invocation_failure(result.error, result.payload)
                if reason is not None:
                    failed.append(f"{path}: {reason}")
    for line in failed:
        print(f"oclaw: invocation failed: {line}", file=sys.stderr)
    return 1 if failed else 0


def _invocation_failure(error: dict[str, Any] | None, payload: bytes | None) -> str | None:
    """Why an invocation failed (a function error, an HTTP or V2 status >= 400, failed batch items), or None."""
    if error is not None:
        return f"{error.get('errorType', 'error')}: {error.get('errorMessage', '')}"
    try:
        reply = json.loads(payload or b"null")
    except ValueError:
        return None
    if not isinstance(reply, dict):
        return None
    status = reply.get("statusCode", reply.get("status") if "error" in reply else None)
    if isinstance(status, int) and status >= 400:
        detail = reply.get("error") or ("" if reply.get("isBase64Encoded") else reply.get("body", ""))
        return f"status {status}: {str(detail)[:300]}"
    items = reply.get("batchItemFailures")
    if isinstance(items, list) and items:
        ids = ", ".join(str(item.get("itemIdentifier")) for item in items if isinstance(item, dict))
        return f"{len(items)} batch item(s) failed: {ids}"
    return None


def _usage(args: argparse.Namespace) -> int:
    import csv

    from engine.metering.batch import read_records
    from engine.metering.records import USAGE_FIELDS, aggregate

    records = []
    for path in args.files:
        try:
            records += read_records(path)
        except (OSError, ValueError) as exc:
            print(f"oclaw: {exc}", file=sys.stderr)
            return 2
    by = args.by
    rows = aggregate(records, by)
    columns = [*by, *USAGE_FIELDS]
    if args.csv:
        writer = csv.DictWriter(sys.stdout, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
        return 0
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        cells = [
            f"{row[c]:.6f}" if c == "cost_usd" else f"{row[c]:.3f}" if isinstance(row[c], float) else str(row[c])
            for c in columns
        ]
        print("| " + " | ".join(cells) + " |")
    return 0


def _ranged(kind: type[int] | type[float], low: float, high: float | None = None) -> Callable[[str], Any]:
    """An argparse type: a number of ``kind`` in [low, high], else a message that gives the range."""
    span = f"from {low:g} to {high:g}" if high is not None else f">= {low:g}"
    noun = "an integer" if kind is int else "a number"

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {noun} {span}, got {text!r}") from None
        if not (low <= value and (high is None or value <= high)):
            raise argparse.ArgumentTypeError(f"expected {noun} {span}, got {text!r}")
        return value

    return parse


def _key_value(text: str) -> tuple[str, str]:
    """An argparse type: ``KEY=VALUE``."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


#: What ``oclaw usage --by`` groups on: the day, or a metering record's field that names rather than measures.
GROUP_FIELDS = ("tenant", "model", "version", "day", "platform", "instance_id", "cold", "status", "source")


def _group_by(text: str) -> list[str]:
    """An argparse type: comma-separated GROUP_FIELDS."""
    by = [field.strip() for field in text.split(",") if field.strip()]
    unknown = [field for field in by if field not in GROUP_FIELDS]
    if unknown or not by:
        what = f"unknown field(s) {', '.join(unknown)}" if unknown else "no field"
        raise argparse.ArgumentTypeError(f"{what}; group by some of {', '.join(GROUP_FIELDS)}")
    return by


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``oclaw`` console script."""
    from engine import __version__
    from engine.errors import ConfigError

    parser = argparse.ArgumentParser(prog="oclaw", description="Cold-start-optimised ONNX inference server.")
    parser.add_argument("--version", action="version", version=f"oclaw {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve a model repository over the V2 inference protocol")
    serve.add_argument("--model-repository", help="repository directory (default: $OCLAW_MODEL_REPOSITORY or ./models)")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=_ranged(int, 1, 65535), default=None, help="port (default: $PORT or 8000)")
    serve.set_defaults(func=_serve)
    prep = sub.add_parser(
        "prepare", help="optimise every model's graph ahead of time (run it on the target CPU family)"
    )
    prep.add_argument("--model-repository", help="repository directory (default: $OCLAW_MODEL_REPOSITORY or ./models)")
    prep.add_argument(
        "--level",
        choices=("all", "extended"),
        default="all",
        help="all: fastest, specific to this CPU family (checked at load); extended: portable",
    )
    prep.add_argument("models", nargs="*", help="models to prepare (default: all)")
    prep.set_defaults(func=model_commands.prepare_command)
    opt = sub.add_parser(
        "optimize",
        help="write an INT8/FP16 version of a model (as the next version) whose metric stays within a budget",
    )
    opt.add_argument("model", help="the model to optimize")
    opt.add_argument("--model-repository", help="repository directory (default: $OCLAW_MODEL_REPOSITORY or ./models)")
    opt.add_argument("--version", type=_ranged(int, 1), help="source version (default: the highest)")
    opt.add_argument(
        "--precision",
        choices=("int8", "fp16", "auto"),
        required=True,
        help="int8: static QDQ and dynamic; fp16: for GPUs, fp32 inputs/outputs; auto: all, the fastest that holds",
    )
    opt.add_argument("--calibration", metavar="PATH", help="folder of images, .npy/.npz, or JSON Lines of V2 requests")
    opt.add_argument("--evaluation", metavar="PATH", help="data the metric is measured on (same forms; labels allowed)")
    opt.add_argument(
        "--metric",
        choices=("top1", "accuracy", "cosine", "max-abs"),
        help="default: accuracy for labelled evaluation data, else top1 agreement with the source",
    )
    opt.add_argument(
        "--max-drop",
        type=_ranged(float, 0),
        help="largest loss of the metric allowed (default 0.01; cosine 0.001; max-abs needs one)",
    )
    opt.add_argument(
        "--calibration-method",
        choices=("minmax", "percentile", "entropy", "auto"),
        default="auto",
        help="static INT8 calibration (auto: minmax, then the others if it breaks the budget)",
    )
    opt.add_argument(
        "--int8-mode",
        choices=("static", "dynamic", "auto"),
        default="auto",
        help="INT8 conversions to try: static QDQ, dynamic (MatMul/Gemm), or both, the faster that holds (default)",
    )
    opt.add_argument(
        "--report", metavar="DIR", help="also write every configuration tried and a plot (needs matplotlib)"
    )
    opt.set_defaults(func=model_commands.optimize_command)
    conv = sub.add_parser(
        "convert",
        help="convert a scikit-learn or PyTorch model to ONNX as the next version, checked against the framework",
        description="Loading a pickle, joblib, TorchScript or .pt2 file, or a Python file, runs code from it: "
        "convert only files you trust.",
    )
    conv.add_argument("framework", choices=("sklearn", "torch"), help="sklearn (oclaw[convert-sklearn]) or torch")
    conv.add_argument(
        "source",
        help="sklearn: a .pkl/.pickle/.joblib file; torch: file.py:factory (returns an nn.Module), a torch.export "
        ".pt2 file or a TorchScript .pt/.ts file",
    )
    conv.add_argument("--model-repository", help="repository directory (default: $OCLAW_MODEL_REPOSITORY or ./models)")
    conv.add_argument("--name", required=True, help="the model's name in the repository (created if new)")
    conv.add_argument("--sample", required=True, help="sample inputs: .npy (one input) or .npz (one array per input)")
    conv.add_argument(
        "--tolerance", type=_ranged(float, 0), default=1e-5, help="largest abs difference allowed (default 1e-5)"
    )
    conv.add_argument("--opset", type=_ranged(int, 7, 30), default=18, help="ONNX opset (default 18)")
    conv.add_argument("--dynamic-batch", action="store_true", help="torch: any batch size (sklearn models have one)")
    conv.set_defaults(func=model_commands.convert_command)
    pub = sub.add_parser(
        "publish", help="upload a local model repository (validated first) to s3://bucket/prefix, manifests included"
    )
    pub.add_argument("repository", help="local repository directory (<model>/<version>/model.onnx)")
    pub.add_argument("destination", help="s3://bucket[/prefix] (serve it with OCLAW_MODEL_REPOSITORY)")
    pub.add_argument("--model", action="append", default=[], metavar="NAME", help="publish only these (repeatable)")
    pub.set_defaults(func=model_commands.publish_command)
    pack = sub.add_parser(
        "pack", help="write one model (manifest, labels, versions) as a single .oclaw file with sha256 checksums"
    )
    pack.add_argument("model", help="the model's directory (<repository>/<model>)")
    pack.add_argument("--out", metavar="FILE", help="the pack to write (default: ./<model>.oclaw)")
    pack.add_argument(
        "--versions",
        nargs="+",
        type=_ranged(int, 1),
        metavar="N",
        help="versions to include (default: those the manifest's policy serves, the latest by default)",
    )
    pack.set_defaults(func=model_commands.pack_command)
    lam = sub.add_parser("lambda", help="run the Lambda handler locally, as Lambda does (no Docker)")
    lam_sub = lam.add_subparsers(dest="lambda_command", required=True)
    inv = lam_sub.add_parser("invoke", help="INIT once under awslambdaric, then invoke each event; print REPORT lines")
    inv.add_argument("events", nargs="+", help="JSON files, one event each")
    inv.add_argument("--model-repository", help="sets OCLAW_MODEL_REPOSITORY for the function")
    inv.add_argument("--handler", default="handler.aws_lambda.lambda_handler")
    inv.add_argument(
        "--memory", type=_ranged(int, 128, 10240), default=1024, help="memory size in MB reported (default 1024)"
    )
    inv.add_argument(
        "--timeout", type=_ranged(float, 0.001, 900), default=30.0, help="seconds before an invocation is killed"
    )
    inv.add_argument("--repeat", type=_ranged(int, 1), default=1, help="invoke the events this many times")
    inv.add_argument("--snap-start", action="store_true", help="INIT as SnapStart does (hooks, then restore)")
    inv.add_argument(
        "--env", action="append", type=_key_value, default=[], metavar="KEY=VALUE", help="extra environment"
    )
    inv.set_defaults(func=_lambda_invoke)
    keys.add_parser(sub)
    usage = sub.add_parser("usage", help="aggregate metering records (JSON Lines or log lines) into a table or CSV")
    usage.add_argument("files", nargs="+", help="files of metering records (jsonl sink output, or logs)")
    usage.add_argument(
        "--by",
        type=_group_by,
        default="tenant,model,day",
        help=f"fields to group by, comma-separated: {', '.join(GROUP_FIELDS)} (default: tenant,model,day)",
    )
    usage.add_argument("--csv", action="store_true", help="CSV instead of a table")
    usage.set_defaults(func=_usage)
    cost_command.add_parser(sub)
    version = sub.add_parser("version", help="print the version")
    version.set_defaults(func=lambda _: print(json.dumps({"oclaw": __version__})) or 0)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"oclaw: {exc.message}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
