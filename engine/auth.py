"""API keys and roles: key entries, hashing, lookup, the role each route needs, per-key token buckets.

A key is ``oclaw_<id>_<secret>``: the id (12 hex digits) is not secret and finds the key's entry; the entry keeps
the SHA-256 of the whole key, never the key. Roles rank ``reader`` < ``invoker`` < ``admin``. No web imports: the
server's ASGI app and the Lambda handler both call ``KeyRing.authorize`` with the method and path they route on.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

from engine.errors import ConfigError, OclawError

log = logging.getLogger("oclaw.auth")

ROLES = ("reader", "invoker", "admin")
_RANK = {role: rank for rank, role in enumerate(ROLES)}
#: What each role may do, for messages and docs.
ALLOWED = {
    "reader": "health, server and model metadata, statistics",
    "invoker": "reader's routes and inference on the models the key allows",
    "admin": "every route: also repository load/unload and warm",
}
_KEY = re.compile(r"oclaw_(?P<id>[0-9a-f]{12})_[A-Za-z0-9_-]{43}")
#: Longest credential looked at; anything longer is refused before it is hashed.
MAX_KEY_CHARS = 64
UNAUTHENTICATED = "missing or invalid API key"
_DUMMY_HASH = hashlib.sha256(b"no such key").hexdigest()


class Unauthenticated(OclawError):
    """No valid API key (401); the message is the same whether a key is unknown, malformed or absent."""

    status = HTTPStatus.UNAUTHORIZED


class Forbidden(OclawError):
    """A valid key without the role, or the model, the request needs (403)."""

    status = HTTPStatus.FORBIDDEN


class RateLimited(OclawError):
    """The key's token bucket is empty (429); ``retry_after_s`` for the ``Retry-After`` header."""

    status = HTTPStatus.TOO_MANY_REQUESTS

    def __init__(self, message: str, *, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclass(frozen=True, slots=True)
class Need:
    """What a request needs: a role (None: nothing, an open health probe) and the model it names, if any."""

    role: str | None
    model: str | None = None


OPEN = Need(None)
#: Unknown routes (and ambiguous paths) need the strongest role: deny by default.
UNKNOWN = Need("admin")

_M = r"(?P<model>[^/]+)(?:/versions/[^/]+)?"
#: (methods, path pattern, role) in the order the routers try them; HEAD is served by every GET route.
_ROUTES: tuple[tuple[frozenset[str], re.Pattern[str], str | None], ...] = tuple(
    (frozenset(methods), re.compile(pattern), role)
    for methods, pattern, role in (
        (("POST",), rf"/v2/models/{_M}/infer", "invoker"),
        (("GET", "HEAD"), r"/v2/health/(?:live|ready)", None),
        (("GET", "HEAD"), r"/v2", "reader"),
        (("GET", "HEAD"), r"/metrics", "reader"),
        (("GET", "HEAD"), r"/v2/models/stats", "reader"),
        (("GET", "HEAD"), rf"/v2/models/{_M}(?:/ready|/stats|/config)?", "reader"),
        (("POST",), r"/v2/repository/index", "reader"),
        (("POST",), r"/v2/repository/models/(?P<model>[^/]+)/(?:load|unload)", "admin"),
        (("POST",), r"/v2/warm", "admin"),
    )
)


def requirement(method: str, path: str) -> Need:
    """The role (and model) ``method path`` needs, the path as the router sees it; unknown routes need admin."""
    path = path.rstrip("/") or "/"  # as handler/v2.route; the full app redirects a trailing slash (checked again)
    method = method.upper()
    for methods, pattern, role in _ROUTES:
        if method in methods and (match := pattern.fullmatch(path)):
            return Need(role, match.groupdict().get("model"))
    return UNKNOWN


def requirement_of(method: str, paths: Iterable[str]) -> Need:
    """One requirement for the spellings of a path different routers may see (raw, decoded); UNKNOWN when they
    disagree, so a path cannot pass as one route and be served as another."""
    needs = {requirement(method, path) for path in paths}
    return needs.pop() if len(needs) == 1 else UNKNOWN


def hash_key(key: str) -> str:
    """The stored form of a key: SHA-256 hex.

    A plain hash is enough here (no salt, no slow KDF): keys are 256-bit random, not passwords, so no dictionary or
    brute-force search of the hash is feasible, and a fast hash keeps the check to a few microseconds.
    """
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()


@dataclass(frozen=True, slots=True)
class KeyEntry:
    """A stored key: its id, the SHA-256 of the key, role, metering tenant, allowed models, rate limit."""

    id: str
    sha256: str
    role: str
    tenant: str
    #: Models the key may name; empty: every model.
    models: tuple[str, ...] = ()
    name: str = ""
    #: Requests per second this instance lets the key make (0: no limit), with bursts of up to ``burst``.
    rate: float = 0.0
    burst: int = 0

    def as_dict(self) -> dict[str, Any]:
        """The entry as it is stored in the key file."""
        out: dict[str, Any] = {"id": self.id, "sha256": self.sha256, "role": self.role, "tenant": self.tenant}
        if self.models:
            out["models"] = list(self.models)
        if self.name:
            out["name"] = self.name
        if self.rate:
            out["rate"], out["burst"] = self.rate, self.burst
        return out

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any], where: str) -> KeyEntry:
        """An entry from the key file; ConfigError naming ``where`` when it is not one."""

        def bad(why: str) -> ConfigError:
            return ConfigError(f"{where}: {why}")

        if "key" in doc or "secret" in doc:
            raise bad("holds a key in plain text; store only the entry `oclaw keys create` prints")
        if unknown := sorted(set(doc) - {"id", "sha256", "role", "tenant", "models", "name", "rate", "burst"}):
            raise bad(f"unknown fields {unknown}")
        key_id, digest, role, tenant = doc.get("id"), doc.get("sha256"), doc.get("role"), doc.get("tenant")
        if not isinstance(key_id, str) or not re.fullmatch(r"[0-9a-f]{12}", key_id):
            raise bad("'id' must be the 12 hex digits after 'oclaw_' in the key")
        if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise bad("'sha256' must be the key's SHA-256 in hex")
        if role not in ROLES:
            raise bad(f"'role' must be one of {', '.join(ROLES)}")
        if not isinstance(tenant, str) or not tenant:
            raise bad("'tenant' must be a non-empty string")
        models = doc.get("models", [])
        if not isinstance(models, list) or not all(isinstance(m, str) and m for m in models):
            raise bad("'models' must be a list of model names")
        rate, burst = doc.get("rate", 0), doc.get("burst", 0)
        if not isinstance(rate, int | float) or isinstance(rate, bool) or not 0 <= rate < float("inf"):
            raise bad("'rate' must be a number of requests per second >= 0")
        if not isinstance(burst, int) or isinstance(burst, bool) or burst < 0:
            raise bad("'burst' must be an integer >= 0")
        name = doc.get("name", "")
        if not isinstance(name, str):
            raise bad("'name' must be a string")
        burst = burst or (max(1, int(rate)) if rate else 0)
        return cls(key_id, digest, role, tenant, tuple(models), name, float(rate), burst)


def create_key(
    role: str, tenant: str, *, models: Sequence[str] = (), name: str = "", rate: float = 0.0, burst: int = 0
) -> tuple[str, KeyEntry]:
    """A new random key (256 bits) and the entry to store for it."""
    if role not in ROLES:
        raise ConfigError(f"unknown role {role!r}; use one of {', '.join(ROLES)}")
    key_id = os.urandom(6).hex()
    secret = base64.urlsafe_b64encode(os.urandom(32)).rstrip(b"=").decode("ascii")
    key = f"oclaw_{key_id}_{secret}"
    doc: dict[str, Any] = {
        "id": key_id,
        "sha256": hash_key(key),
        "role": role,
        "tenant": tenant,
        "models": list(models),
    }
    doc |= {"name": name, "rate": rate, "burst": burst}
    return key, KeyEntry.from_dict(doc, "the new key")


@dataclass(slots=True)
class _Bucket:
    tokens: float
    at: float


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a request's key says it is."""

    key_id: str
    role: str
    tenant: str
    name: str


def credential(authorization: Sequence[str], api_key: Sequence[str]) -> str | None:
    """The one key a request carries, or None when it carries none, several different ones, or one of another form.

    ``X-API-Key`` decides when present, and ``Authorization`` is then left to the platform in front (a Cloud Run
    IAM identity token, the SigV4 signature of an IAM Function URL); otherwise ``Authorization: Bearer``.
    """
    found: set[str] = set()
    if api_key:
        found.update(value.strip() for value in api_key)
    else:
        for value in authorization:
            scheme, _, token = value.strip().partition(" ")
            if scheme.lower() != "bearer":
                return None
            found.add(token.strip())
    if len(found) != 1:
        return None
    key = found.pop()
    return key if len(key) <= MAX_KEY_CHARS else None


@dataclass
class KeyRing:
    """The keys of one process, found by id; also each key's token bucket (per instance).

    With a ``reload`` (keys in SSM or Secrets Manager), the entries are fetched again ``ttl_s`` after the last
    fetch, on the request that finds them stale; a failed fetch keeps the entries it has, and is logged.
    """

    entries: Mapping[str, KeyEntry]
    source: str = ""
    reload: Callable[[], Mapping[str, KeyEntry]] | None = None
    ttl_s: float = 300.0
    _buckets: dict[str, _Bucket] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _fetched: float = field(default_factory=time.monotonic, repr=False)

    def __len__(self) -> int:
        return len(self.entries)

    def refresh(self, now: float | None = None) -> None:
        """Fetch the entries again when they are older than ``ttl_s`` (nothing for a key file)."""
        now = time.monotonic() if now is None else now
        if self.reload is None or now - self._fetched < self.ttl_s:
            return
        self._fetched = now  # one request fetches; the others go on with the entries there are
        try:
            self.entries = self.reload()
        except Exception as exc:  # noqa: BLE001 - a store that does not answer must not lock every key out
            log.warning("could not refresh the API keys from %s (the last ones stay): %s", self.source, exc)

    def authenticate(self, key: str | None) -> KeyEntry:
        """The entry of a valid key; Unauthenticated (one message for every reason) otherwise."""
        if self.reload is not None:
            self.refresh()
        match = _KEY.fullmatch(key) if key is not None else None
        entry = self.entries.get(match["id"]) if match is not None else None
        # hashed and compared even for an unknown id, so the answer takes as long for a key that does not exist
        digest = hash_key(key or "")
        if not hmac.compare_digest(digest, entry.sha256 if entry is not None else _DUMMY_HASH) or entry is None:
            raise Unauthenticated(UNAUTHENTICATED)
        return entry

    def identify(self, key: str | None) -> Principal | None:
        """Whose a well-formed key's id says it is, unchecked: for the audit record of a request refused after
        its key was authenticated (403, 429); None for a key of another form or an unknown id."""
        match = _KEY.fullmatch(key) if key is not None else None
        entry = self.entries.get(match["id"]) if match is not None else None
        return None if entry is None else Principal(entry.id, entry.role, entry.tenant, entry.name)

    def authorize(
        self, need: Need, key: str | None, *, now: float | None = None, charge: bool = True
    ) -> Principal | None:
        """The principal allowed ``need`` (None for an open route); Unauthenticated, Forbidden or RateLimited.

        ``charge=False``: a second check of a request already counted against the key's rate limit.
        """
        if need.role is None:
            return None
        entry = self.authenticate(key)
        if _RANK[entry.role] < _RANK[need.role]:
            raise Forbidden(f"this API key's role ({entry.role}) may not do this; it needs the {need.role} role")
        if need.model is not None and entry.models and need.model not in entry.models:
            raise Forbidden("this API key is not allowed to use this model")
        if entry.rate and charge:
            self._take(entry, time.monotonic() if now is None else now)
        return Principal(entry.id, entry.role, entry.tenant, entry.name)

    def _take(self, entry: KeyEntry, now: float) -> None:
        """One token from the key's bucket (``rate`` a second, up to ``burst``); RateLimited when it is empty."""
        with self._lock:
            bucket = self._buckets.get(entry.id)
            if bucket is None:
                bucket = self._buckets[entry.id] = _Bucket(float(entry.burst), now)
            bucket.tokens = min(float(entry.burst), bucket.tokens + (now - bucket.at) * entry.rate)
            bucket.at = now
            if bucket.tokens < 1:
                wait = (1 - bucket.tokens) / entry.rate
                raise RateLimited(
                    f"this API key's rate limit ({entry.rate:g}/s, burst {entry.burst}, per instance) is reached",
                    retry_after_s=max(1, int(wait + 0.999)),
                )
            bucket.tokens -= 1


def parse_entries(doc: Any, source: str) -> KeyRing:
    """A KeyRing from a key file's JSON: a list of entries, or ``{"keys": [...]}``."""
    if isinstance(doc, dict):
        doc = doc.get("keys")
    if not isinstance(doc, list):
        raise ConfigError(f'{source}: expected a JSON list of key entries (or {{"keys": [...]}})')
    entries: dict[str, KeyEntry] = {}
    for index, item in enumerate(doc):
        where = f"{source}: entry {index}"
        if not isinstance(item, dict):
            raise ConfigError(f"{where}: expected an object")
        entry = KeyEntry.from_dict(item, where)
        if entry.id in entries:
            raise ConfigError(f"{where}: id {entry.id} appears twice")
        entries[entry.id] = entry
    return KeyRing(entries, source)


def load_keys(path: str) -> KeyRing:
    """The keys in a JSON file (OCLAW_API_KEYS); ConfigError naming the file and the problem."""
    try:
        with open(path, "rb") as fh:
            doc = json.loads(fh.read())
    except OSError as exc:
        raise ConfigError(f"OCLAW_API_KEYS={path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise ConfigError(f"OCLAW_API_KEYS={path}: not JSON: {exc}") from None
    return parse_entries(doc, f"OCLAW_API_KEYS={path}")


#: OCLAW_API_KEYS prefixes of the remote stores: the Powertools Parameters provider of each.
REMOTE = {"ssm:": "SSMProvider", "secretsmanager:": "SecretsProvider"}


def remote_keys(api_keys: str, ttl_s: float) -> KeyRing:
    """Keys kept in an SSM parameter (``ssm:/name``, SecureString decrypted) or a Secrets Manager secret
    (``secretsmanager:name``), read through Powertools Parameters and fetched again after ``ttl_s``."""
    prefix = next(p for p in REMOTE if api_keys.startswith(p))
    name = api_keys[len(prefix) :]
    try:
        from aws_lambda_powertools.utilities import parameters
    except ImportError:  # pragma: no cover - aws-lambda-powertools is in the lambda extra
        raise ConfigError(
            f"OCLAW_API_KEYS={api_keys} needs aws-lambda-powertools: pip install 'oclaw[lambda]'"
        ) from None
    from engine import aws

    service = "ssm" if prefix == "ssm:" else "secretsmanager"
    # quick timeouts, one attempt: a refresh runs on a request's path (the event loop, on a server); when the store
    # does not answer within seconds the keys there are stay, and the next request after the TTL tries again
    provider = getattr(parameters, REMOTE[prefix])(boto3_client=aws.client(service, quick=True))
    options = {"decrypt": True} if prefix == "ssm:" else {}
    where = f"OCLAW_API_KEYS={api_keys}"

    def fetch() -> Mapping[str, KeyEntry]:
        # the TTL is kept here (KeyRing.refresh), so each fetch asks the store: Powertools' own cache would hold the
        # old value for up to its max_age again
        raw = provider.get(name, force_fetch=True, **options)
        try:
            doc = json.loads(raw)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{where}: not JSON: {exc}") from None
        return parse_entries(doc, where).entries

    try:
        entries = fetch()
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - the store's own error, named with the setting
        raise ConfigError(f"{where}: {type(exc).__name__}: {exc}") from None
    return KeyRing(entries, where, reload=fetch, ttl_s=ttl_s)


def keys_for(api_keys: str, mode: str, ttl_s: float = 300.0) -> KeyRing | None:
    """The KeyRing requests are checked against (None: no access control) for OCLAW_API_KEYS and OCLAW_AUTH."""
    if mode == "none":
        return None
    if not api_keys:
        if mode == "keys":
            raise ConfigError("OCLAW_AUTH=keys needs OCLAW_API_KEYS (a JSON file of entries from `oclaw keys create`)")
        return None
    if api_keys.startswith(tuple(REMOTE)):
        return remote_keys(api_keys, ttl_s)
    return load_keys(api_keys)
