"""Every price the modes use: the metering's list prices (``engine.metering.records.PRICES``) and those of the
modes metering never bills (provisioned concurrency, SnapStart, idle minimum instances, an always-on instance),
then a price table's entries, then ``OCLAW_PRICE_*`` overrides; free tiers apart, used only when asked.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

from engine.metering.records import PRICES as METERING_PRICES


class CostError(ValueError):
    """A profile, a records file, a price table or a figure that cannot be used; the message says which and why."""


@dataclass(frozen=True)
class ModePrice:
    """Prices (USD) of the modes beyond the metering's ``PRICES``."""

    #: Lambda provisioned concurrency: per GB-second configured, and the duration of requests it serves.
    provisioned_gb_second: float
    provisioned_duration_gb_second: float
    #: Lambda SnapStart (Python): the snapshot cache per GB-second the version is active, a restore per GB.
    snapstart_cache_gb_second: float
    snapstart_restore_gb: float
    #: Cloud Run request-based billing: an idle minimum instance's vCPU-second and GiB-second.
    cloudrun_idle_vcpu_second: float
    cloudrun_idle_gib_second: float
    #: An always-on instance (AWS Fargate, Linux): per vCPU-hour and per GB-hour.
    always_on_vcpu_hour: float
    always_on_gb_hour: float
    source: str


#: Public list prices (USD) of the further modes, as published in 2025 (us-east-1 for AWS; Cloud Run tier 1).
#: aws.amazon.com/lambda/pricing (Provisioned Concurrency, SnapStart), cloud.google.com/run/pricing (idle minimum
#: instances), aws.amazon.com/fargate/pricing (Linux, per vCPU-hour and GB-hour).
MODE_PRICES: dict[str, ModePrice] = {
    "x86_64": ModePrice(
        provisioned_gb_second=0.0000041667,
        provisioned_duration_gb_second=0.0000097222,
        snapstart_cache_gb_second=0.0000015046,
        snapstart_restore_gb=0.0001397998,
        cloudrun_idle_vcpu_second=0.0000025,
        cloudrun_idle_gib_second=0.0000025,
        always_on_vcpu_hour=0.04048,
        always_on_gb_hour=0.004445,
        source="AWS Lambda provisioned concurrency, SnapStart and Fargate, us-east-1, x86_64, 2025; "
        "Cloud Run tier 1 idle instances, 2025",
    ),
    "arm64": ModePrice(
        provisioned_gb_second=0.0000033334,
        provisioned_duration_gb_second=0.0000077778,
        snapstart_cache_gb_second=0.0000015046,
        snapstart_restore_gb=0.0001397998,
        cloudrun_idle_vcpu_second=0.0000025,
        cloudrun_idle_gib_second=0.0000025,
        always_on_vcpu_hour=0.03238,
        always_on_gb_hour=0.00356,
        source="AWS Lambda provisioned concurrency, SnapStart and Fargate, us-east-1, arm64, 2025; "
        "Cloud Run tier 1 idle instances, 2025",
    ),
}


@dataclass(frozen=True)
class FreeTier:
    """Monthly free allowances (2025): Lambda's, and Cloud Run's for each billing mode. Fargate has none."""

    lambda_gb_seconds: float = 400_000
    lambda_requests: float = 1_000_000
    cloudrun_vcpu_seconds: float = 180_000
    cloudrun_gib_seconds: float = 360_000
    cloudrun_requests: float = 2_000_000
    cloudrun_instance_vcpu_seconds: float = 240_000
    cloudrun_instance_gib_seconds: float = 450_000


@dataclass(frozen=True)
class Prices:
    """Every price the modes use, where they came from, and the free tier (None: ignored)."""

    gb_second: float
    request: float
    cloudrun_vcpu_second: float
    cloudrun_gib_second: float
    cloudrun_request: float
    cloudrun_instance_vcpu_second: float
    cloudrun_instance_gib_second: float
    modes: ModePrice
    sources: tuple[str, ...]
    free: FreeTier | None = None


#: ``OCLAW_PRICE_*`` overrides and the price they replace.
OVERRIDES = {
    "gb_second": "Lambda per GB-second",
    "request": "Lambda per request",
    "vcpu_second": "Cloud Run request-based, per active vCPU-second",
    "gib_second": "Cloud Run request-based, per active GiB-second",
}


#: The AWS region of the list prices above.
LIST_REGION = "us-east-1"


def prices(
    arch: str = "x86_64",
    *,
    region: str = "",
    table: Mapping[str, Any] | None = None,
    overrides: Mapping[str, float] | None = None,
    free_tier: bool = False,
) -> Prices:
    """List prices for ``arch``, then a price table's entries (``key@region`` before ``key``), then overrides.

    Table keys are the metering's (``lambda-x86_64``, ``cloudrun-request``, ``cloudrun-instance``) and
    ``modes-<arch>`` with ``ModePrice`` fields. Overrides are ``OVERRIDES`` (what ``OCLAW_PRICE_*`` set).
    """
    if arch not in MODE_PRICES:
        raise CostError(f"unknown architecture {arch!r}: x86_64 or arm64")
    table = table or {}

    def entry(key: str) -> dict[str, Any]:
        found = table.get(f"{key}@{region}") if region else None
        found = found if found is not None else table.get(key, {})
        if not isinstance(found, dict):
            raise CostError(f"price table: {key!r} must be an object of prices")
        for name, value in found.items():
            if name != "source" and (isinstance(value, bool) or not isinstance(value, int | float) or value < 0):
                raise CostError(f"price table: {key}.{name} must be a number >= 0, got {value!r}")
        return found

    lam = replace(
        METERING_PRICES[f"lambda-{arch}"], **_known(entry(f"lambda-{arch}"), ("gb_second", "request", "source"))
    )
    req = replace(
        METERING_PRICES["cloudrun-request"],
        **_known(entry("cloudrun-request"), ("vcpu_second", "gib_second", "request", "source")),
    )
    inst = replace(
        METERING_PRICES["cloudrun-instance"],
        **_known(entry("cloudrun-instance"), ("vcpu_second", "gib_second", "source")),
    )
    modes = MODE_PRICES[arch]
    modes = replace(modes, **_known(entry(f"modes-{arch}"), (f.name for f in fields(modes))))
    o = dict(overrides or {})
    unpriced = (f"no price-table entry for region {region}: the prices above are not that region's",)
    return Prices(
        gb_second=o.get("gb_second", lam.gb_second),
        request=o.get("request", lam.request),
        cloudrun_vcpu_second=o.get("vcpu_second", req.vcpu_second),
        cloudrun_gib_second=o.get("gib_second", req.gib_second),
        cloudrun_request=req.request,
        cloudrun_instance_vcpu_second=inst.vcpu_second,
        cloudrun_instance_gib_second=inst.gib_second,
        modes=modes,
        sources=(
            lam.source,
            req.source,
            inst.source,
            modes.source,
            *(f"OCLAW_PRICE_{k.upper()}={v:g} ({OVERRIDES[k]})" for k, v in o.items()),
            *(unpriced if region not in ("", LIST_REGION) and not any(k.endswith(f"@{region}") for k in table) else ()),
        ),
        free=FreeTier() if free_tier else None,
    )


def _known(entry: Mapping[str, Any], names: Iterable[str]) -> dict[str, Any]:
    """The entries of a price-table object that a price record has."""
    return {k: entry[k] for k in names if k in entry}
