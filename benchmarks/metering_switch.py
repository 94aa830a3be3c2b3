"""``oclaw serve`` whose metering a benchmark switches on and off, so that one process is measured both ways.

``python -m benchmarks.metering_switch SERVE-ARGS...`` runs ``oclaw serve SERVE-ARGS...``; each line on stdin is a
command, acknowledged by a line on the file descriptor named by ``OCLAW_SWITCH_ACK_FD``. On Lambda,
``benchmarks.metering_switch.lambda_handler`` takes the same commands as ``{"oclaw-switch": COMMAND}`` events:

- ``off``: flush what is queued, then take every sink away (the request path then captures nothing and adds no
  header: exactly what ``OCLAW_METERING_SINKS=none OCLAW_METRICS=false`` give a request);
- ``metrics``: keep only the metrics sinks (Prometheus on a server, EMF on Lambda): usages are captured for the
  metrics, no record is written and no header sent (``OCLAW_METERING_SINKS=none``, or ``emf`` on Lambda);
- ``records``: keep only the sinks that take the records (the log): metering without the metrics
  (``OCLAW_METERING_SINKS=log:packed OCLAW_METRICS=false``, or ``log`` on Lambda);
- ``on``: give every sink back (``oclaw serve``'s defaults: ``log:packed`` and Prometheus);
- ``flush``: send what is queued now (a round's records belong to that round's cost).

Separate server processes differ by ±10 µs a request on their own (memory layout, core placement), more than
the cost being measured; switching inside one process cancels that.
"""

from __future__ import annotations

import os
import sys
import threading
from typing import Any

from engine.metering.meter import Meter

#: The sinks taken away by "off", given back by "on".
_saved: list[Any] = []


def switch(meter: Meter, command: str) -> int:
    """Apply one command (``on``, ``metrics``, ``records``, ``off`` or ``flush``); the number of sinks now on."""
    meter.flush()  # what was queued belongs to the round that queued it
    if not _saved:
        _saved[:] = meter.sinks  # the configured sinks, taken away and given back by the commands
    if command == "off":
        meter.sinks = []
    elif command == "metrics":
        meter.sinks = [sink for sink in _saved if getattr(sink, "metrics_only", False)]
    elif command == "records":
        meter.sinks = [sink for sink in _saved if not getattr(sink, "metrics_only", False)]
    elif command == "on":
        meter.sinks = list(_saved)
    return len(meter.sinks)


def control(ack: int) -> None:
    """Apply the commands read from stdin (``oclaw serve``)."""
    from engine.runtime import get_runtime

    for line in sys.stdin:
        command = line.strip()
        os.write(ack, f"{command} {switch(get_runtime().meter, command)}\n".encode())


def lambda_handler(event: Any, context: Any) -> Any:
    """``handler.aws_lambda.lambda_handler``, plus ``{"oclaw-switch": COMMAND}`` events that switch metering."""
    from handler import aws_lambda

    if isinstance(event, dict) and "oclaw-switch" in event:
        return {"sinks": switch(aws_lambda.RUNTIME.meter, event["oclaw-switch"])}
    return aws_lambda.lambda_handler(event, context)


if __name__ == "__main__":
    from handler.cli import main

    threading.Thread(target=control, args=(int(os.environ["OCLAW_SWITCH_ACK_FD"]),), daemon=True).start()
    sys.exit(main(["serve", *sys.argv[1:]]))
