"""Warm pings: keep N Lambda instances hot, models included (the lambda-warmer pattern)."""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

from engine import aws as aws_clients
from engine.errors import InvalidInput, OclawError
from engine.runtime import Runtime

log = logging.getLogger("oclaw.warmer")

MAX_CONCURRENCY = 200


def is_warm_event(event: Any) -> bool:
    """``{"oclaw": "warm", ...}`` from an EventBridge schedule (or a fan-out from another instance)."""
    return isinstance(event, dict) and event.get("oclaw") == "warm"


def fan_out(function_arn: str, count: int, hold_ms: int, correlation_id: str) -> dict[str, Any]:
    """Invoke ``count`` concurrent warm pings on the same function and qualifier; report who answered."""
    from concurrent.futures import ThreadPoolExecutor

    payload = json.dumps(
        {"oclaw": "warm", "target": True, "hold_ms": hold_ms, "correlation_id": correlation_id}
    ).encode()
    client = aws_clients.client("lambda")

    def one(_: int) -> dict[str, Any]:
        resp = client.invoke(FunctionName=function_arn, InvocationType="RequestResponse", Payload=payload)
        body = resp["Payload"].read()
        if resp.get("FunctionError"):
            return {"error": body.decode(errors="replace")[:200]}
        try:
            return dict(json.loads(body or b"{}"))
        except (ValueError, TypeError):
            return {"error": "unreadable response"}

    answered: list[dict[str, Any]] = []
    errors: list[str] = []
    with ThreadPoolExecutor(max_workers=min(count, 64), thread_name_prefix="oclaw-warm") as pool:
        for future in [pool.submit(one, i) for i in range(count)]:
            try:
                answer = future.result()
            except Exception as exc:  # noqa: BLE001 - a failed ping is reported, never raised
                errors.append(f"{type(exc).__name__}: {exc}")
                continue
            (errors.append(answer["error"]) if "error" in answer else answered.append(answer))
    ids = sorted({a["instance_id"] for a in answered if isinstance(a.get("instance_id"), str)})
    return {"requested": count, "answered": len(answered), "errors": errors[:5], "instance_ids": ids}


def _metrics(cold: bool, instances: int) -> None:
    """Warm/cold counts as CloudWatch EMF log lines (no network call)."""
    try:
        from aws_lambda_powertools.metrics import MetricUnit, single_metric
    except ImportError:  # pragma: no cover - powertools is part of the lambda extra
        return
    with single_metric(name="WarmPings", unit=MetricUnit.Count, value=1, namespace="oclaw") as metric:
        metric.add_dimension(name="cold", value=str(cold).lower())
    if instances > 1:
        with single_metric(name="WarmInstances", unit=MetricUnit.Count, value=instances, namespace="oclaw"):
            pass


def handle(
    event: dict[str, Any], context: Any, runtime: Runtime, *, cold: bool, last_traffic_s: float | None
) -> dict[str, Any]:
    """Warm every pooled model, fan out when asked, and say which instance answered (audited: one record)."""
    status = 200
    try:
        return _warm(event, context, runtime, cold=cold, last_traffic_s=last_traffic_s)
    except OclawError as exc:
        status = int(exc.status)
        raise
    except Exception:
        status = 500
        raise
    finally:
        if (audit := runtime.audit) is not None:
            audit.record(
                "warm",
                "ok" if status == 200 else "error",
                status,
                request_id=getattr(context, "aws_request_id", None) or runtime.next_request_id(),
                source="warm",
            )


def _warm(
    event: dict[str, Any], context: Any, runtime: Runtime, *, cold: bool, last_traffic_s: float | None
) -> dict[str, Any]:
    settings = runtime.settings
    warmed = {f"{m.name}/{m.version}": round(m.ping(), 3) for m in runtime.pool.loaded()}
    result: dict[str, Any] = {
        "instance_id": runtime.instance_id,
        "cold": cold,
        "models_warmed": sorted(warmed),
        "warm_ms": warmed,
    }
    if event.get("target"):
        hold = event.get("hold_ms", settings.warmer_hold_ms)
        if isinstance(hold, int) and 0 < hold <= 5000:
            time.sleep(hold / 1000)  # hold this instance so concurrent pings land on distinct ones
        return result
    concurrency = event.get("concurrency", 1)
    if type(concurrency) is not int or not 1 <= concurrency <= MAX_CONCURRENCY:
        raise InvalidInput(f"warm event: concurrency must be an integer from 1 to {MAX_CONCURRENCY}")
    instances = 1
    if concurrency > 1:
        if last_traffic_s is not None and last_traffic_s < settings.warmer_traffic_window_s:
            result["fanout"] = {"skipped": f"real traffic {last_traffic_s:.1f} s ago; pings would collide with it"}
        else:
            fan = fan_out(
                context.invoked_function_arn,
                concurrency - 1,
                settings.warmer_hold_ms,
                str(event.get("correlation_id") or os.urandom(8).hex()),
            )
            fan["instance_ids"] = sorted(set(fan["instance_ids"]) | {runtime.instance_id})
            instances = len(fan["instance_ids"])
            result["fanout"] = fan
    result["instances"] = instances
    _metrics(cold, instances)
    return result
