"""``oclaw serve`` whose metering a benchmark switches on and off, so that one process is measured both ways.

``python -m benchmarks.metering_switch SERVE-ARGS...`` runs ``oclaw serve SERVE-ARGS...``; each line on stdin is a
command, acknowledged by a line on the file descriptor named by ``OCLAW_SWITCH_ACK_FD``:

- ``off``: flush what is queued, then take every sink away (the request path then captures nothing and adds no
  header: exactly what ``OCLAW_METERING_SINKS=none OCLAW_METRICS=false`` give a request);
- ``on``: give the sinks back (the log sink and Prometheus, ``oclaw serve``'s defaults);
- ``flush``: send what is queued now (a round's records belong to that round's cost).

Separate server processes differ by ±10 µs a request on their own (memory layout, core placement), more than
the cost being measured; switching inside one process cancels that.
"""

from __future__ import annotations

import os
import sys
import threading
from typing import Any

from engine.runtime import get_runtime
from handler.cli import main


def control(ack: int) -> None:
    """Apply the commands read from stdin."""
    saved: list[Any] = []
    for line in sys.stdin:
        command = line.strip()
        meter = get_runtime().meter
        if command in ("off", "flush"):
            meter.flush()
        if command == "off" and meter.sinks:
            saved, meter.sinks = meter.sinks, []
        elif command == "on" and not meter.sinks:
            meter.sinks = saved
        os.write(ack, f"{command} {len(meter.sinks)}\n".encode())


if __name__ == "__main__":
    threading.Thread(target=control, args=(int(os.environ["OCLAW_SWITCH_ACK_FD"]),), daemon=True).start()
    sys.exit(main(["serve", *sys.argv[1:]]))
