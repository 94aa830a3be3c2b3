"""``oclaw keys create``: a new API key, printed once, and the entry to store in the OCLAW_API_KEYS file."""

from __future__ import annotations

import argparse
import ipaddress
import json
import sys

from engine import auth
from engine.config import Settings
from engine.errors import ConfigError


def create_command(args: argparse.Namespace) -> int:
    """Print the key (stderr, once: it is kept nowhere) and its entry (stdout); with ``--add``, append the entry."""
    models = [m.strip() for m in (args.models or "").split(",") if m.strip()]
    if args.rate is None and args.burst:
        print("oclaw: --burst needs --rate", file=sys.stderr)
        return 2
    key, entry = auth.create_key(
        args.role, args.tenant, models=models, name=args.name or "", rate=args.rate or 0.0, burst=args.burst or 0
    )
    if args.add:
        try:
            add_entry(args.add, entry)
        except ConfigError as exc:
            print(f"oclaw: {exc.message}", file=sys.stderr)
            return 2
    print(f"API key (shown once; oclaw keeps only its hash): {key}", file=sys.stderr)
    print(json.dumps({"key": key, "entry": entry.as_dict()} if args.json else entry.as_dict()))
    return 0


def add_entry(path: str, entry: auth.KeyEntry) -> None:
    """Append ``entry`` to the key file at ``path`` (created when absent), checking the file as the server does."""
    try:
        with open(path, encoding="utf-8") as fh:
            doc = json.load(fh)
    except FileNotFoundError:
        doc = []
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: {exc}") from None
    entries = doc.get("keys") if isinstance(doc, dict) else doc
    if not isinstance(entries, list):
        raise ConfigError(f"{path}: expected a JSON list of key entries")
    entries.append(entry.as_dict())
    auth.parse_entries(doc, path)  # the whole file still loads
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(doc, fh, indent=2)
        fh.write("\n")


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or ``localhost``) is reachable only from this machine."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name: it may resolve to any address


def refusal(settings: Settings, host: str) -> str | None:
    """Why ``oclaw serve`` must not start on ``host`` with these settings (no keys off loopback), or None."""
    if settings.auth == "none" or settings.api_keys or is_loopback(host):
        return None
    return (
        f"refusing to serve on {host} without API keys: set OCLAW_API_KEYS to a key file (`oclaw keys create`), "
        "or OCLAW_AUTH=none to serve without access control"
    )


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """The ``keys`` command and its ``create`` subcommand."""
    keys = sub.add_parser("keys", help="API keys for OCLAW_API_KEYS")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    create = keys_sub.add_parser(
        "create",
        help="generate a key: the key goes to stderr once, the entry to store (its hash, never the key) to stdout",
    )
    create.add_argument(
        "--role", choices=auth.ROLES, required=True, help="; ".join(f"{r}: {w}" for r, w in auth.ALLOWED.items())
    )
    create.add_argument("--tenant", required=True, help="the tenant the key's requests are metered to")
    create.add_argument("--models", help="comma-separated models the key may use (default: every model)")
    create.add_argument("--name", help="a label for the key (who holds it)")
    create.add_argument("--rate", type=float, help="requests per second per instance (default: no limit)")
    create.add_argument("--burst", type=int, help="requests allowed at once above the rate (default: the rate)")
    create.add_argument("--add", metavar="FILE", help="also append the entry to this key file (created if absent)")
    create.add_argument("--json", action="store_true", help='print {"key": ..., "entry": ...} on stdout instead')
    create.set_defaults(func=create_command)
