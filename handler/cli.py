"""The ``oclaw`` command line."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from time import perf_counter_ns
from typing import Any

_T0 = perf_counter_ns()


def _serve(args: argparse.Namespace) -> int:
    from engine.config import Settings
    from engine.errors import ConfigError

    try:
        overrides = {"model_repository": args.model_repository} if args.model_repository else {}
        settings = Settings.from_env(**overrides)
    except ConfigError as exc:
        print(f"oclaw: {exc.message}", file=sys.stderr)
        return 2
    from engine.logs import configure

    configure(settings.log_level, settings.log_format)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
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
    port = args.port if args.port is not None else int(os.environ.get("PORT", "8000"))

    from handler.server import serve

    return serve(settings, host=args.host, port=port, started_ns=_T0)


def _prepare(args: argparse.Namespace) -> int:
    from engine.config import Settings
    from engine.errors import OclawError
    from engine.optimize.prepare import prepare_repository

    overrides = {"model_repository": args.model_repository} if args.model_repository else {}
    try:
        settings = Settings.from_env(**overrides)
        read_only = _read_only_dirs(settings.model_repository, args.models)
        if read_only:
            print(
                f"oclaw: {read_only[0]} is read-only (e.g. a Lambda layer under /opt): prepared graphs are written "
                "beside model.onnx, so prepare the repository before packaging or publishing it",
                file=sys.stderr,
            )
            return 2
        done = prepare_repository(settings, level=args.level, models=args.models or None)
    except OclawError as exc:
        print(f"oclaw: {exc.message}", file=sys.stderr)
        return 2
    for row in done:
        print(json.dumps(row))
    if not done:
        print("oclaw: no models found to prepare", file=sys.stderr)
        return 1
    return 0


def _read_only_dirs(root: str, models: list[str]) -> list[str]:
    """Version directories of a local repository that this process cannot write to."""
    from engine.repository.local import LocalRepository

    repo = LocalRepository(root)
    dirs = [repo.root / name / str(v) for name in models or repo.models() for v in repo.versions(name)]
    return [str(d) for d in dirs if not os.access(d, os.W_OK)]


def _publish(args: argparse.Namespace) -> int:
    from engine.config import Settings
    from engine.errors import OclawError
    from engine.repository.publish import publish

    start = perf_counter_ns()
    try:
        concurrency = Settings.from_env().fetch_concurrency
        rows = publish(args.repository, args.destination, models=args.model or None, concurrency=concurrency)
    except OclawError as exc:
        print(f"oclaw: {exc.message}", file=sys.stderr)
        return 2
    for row in rows:
        print(json.dumps(row))
    total = sum(row["bytes"] for row in rows)
    models = sorted({row["uri"][len(args.destination.rstrip("/")) + 1 :].split("/", 1)[0] for row in rows})
    summary = {"published": models, "files": len(rows), "bytes": total, "mb": round(total / 1e6, 2)}
    print(json.dumps({**summary, "ms": round((perf_counter_ns() - start) / 1e6, 1)}))
    return 0


def _lambda_invoke(args: argparse.Namespace) -> int:
    from handler.local_lambda import LocalLambda

    events = []
    for path in args.events:
        try:
            with open(path, "rb") as fh:
                events.append(json.loads(fh.read()))
        except (OSError, ValueError) as exc:
            print(f"oclaw: {path}: {exc}", file=sys.stderr)
            return 2
    env = dict(item.split("=", 1) for item in args.env)
    if args.model_repository:
        env["OCLAW_MODEL_REPOSITORY"] = args.model_repository
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
        failed = 0
        for _ in range(args.repeat):
            for event in events:
                result = fn.invoke(event)
                if result.error is not None:
                    failed += 1
                    print(json.dumps(result.error))
                else:
                    print((result.payload or b"").decode(errors="replace"))
                print(result.report_line(), file=sys.stderr)
    return 1 if failed else 0


def _metering_records(path: str) -> list[dict[str, Any]]:
    """Metering records in a file: the jsonl sink's lines, or log lines that carry a JSON record (or packed ones)."""
    from engine.metering.batch import unpack

    records: list[dict[str, Any]] = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            start = line.find("{")
            if start < 0:
                continue
            try:
                record = json.loads(line[start:])
            except ValueError:
                continue  # other log lines
            if isinstance(record, dict) and record.get("event", "metering") == "metering" and "cost_usd" in record:
                records += unpack(record)  # a record, or a packed line of them
    return records


def _usage(args: argparse.Namespace) -> int:
    import csv

    from engine.metering.records import USAGE_FIELDS, aggregate

    records = []
    for path in args.files:
        try:
            records += _metering_records(path)
        except OSError as exc:
            print(f"oclaw: {exc}", file=sys.stderr)
            return 2
    by = [field.strip() for field in args.by.split(",") if field.strip()]
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


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``oclaw`` console script."""
    parser = argparse.ArgumentParser(prog="oclaw", description="Cold-start-optimised ONNX inference server.")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve a model repository over the V2 inference protocol")
    serve.add_argument("--model-repository", help="repository directory (default: $OCLAW_MODEL_REPOSITORY or ./models)")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=None, help="port (default: $PORT or 8000)")
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
    prep.set_defaults(func=_prepare)
    pub = sub.add_parser(
        "publish", help="upload a local model repository (validated first) to s3://bucket/prefix, manifests included"
    )
    pub.add_argument("repository", help="local repository directory (<model>/<version>/model.onnx)")
    pub.add_argument("destination", help="s3://bucket[/prefix] (serve it with OCLAW_MODEL_REPOSITORY)")
    pub.add_argument("--model", action="append", default=[], metavar="NAME", help="publish only these (repeatable)")
    pub.set_defaults(func=_publish)
    lam = sub.add_parser("lambda", help="run the Lambda handler locally, as Lambda does (no Docker)")
    lam_sub = lam.add_subparsers(dest="lambda_command", required=True)
    inv = lam_sub.add_parser("invoke", help="INIT once under awslambdaric, then invoke each event; print REPORT lines")
    inv.add_argument("events", nargs="+", help="JSON files, one event each")
    inv.add_argument("--model-repository", help="sets OCLAW_MODEL_REPOSITORY for the function")
    inv.add_argument("--handler", default="handler.aws_lambda.lambda_handler")
    inv.add_argument("--memory", type=int, default=1024, help="memory size in MB reported (default 1024)")
    inv.add_argument("--timeout", type=float, default=30.0, help="seconds before an invocation is killed")
    inv.add_argument("--repeat", type=int, default=1, help="invoke the events this many times")
    inv.add_argument("--snap-start", action="store_true", help="INIT as SnapStart does (hooks, then restore)")
    inv.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="extra environment")
    inv.set_defaults(func=_lambda_invoke)
    usage = sub.add_parser("usage", help="aggregate metering records (JSON Lines or log lines) into a table or CSV")
    usage.add_argument("files", nargs="+", help="files of metering records (jsonl sink output, or logs)")
    usage.add_argument(
        "--by", default="tenant,model,day", help="fields to group by (tenant, model, day, platform, ...)"
    )
    usage.add_argument("--csv", action="store_true", help="CSV instead of a table")
    usage.set_defaults(func=_usage)
    version = sub.add_parser("version", help="print the version")
    version.set_defaults(func=lambda _: print(json.dumps({"oclaw": __import__("engine").__version__})) or 0)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
