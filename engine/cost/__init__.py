"""What a month of traffic costs in each deployment mode (``oclaw cost``): list prices of the modes (``prices``),
traffic profiles (``profiles``), per-request figures from metering records (``workload``), a simulation of
arrivals against a pool of instances with an idle lifetime (``simulation``) and the modes' bills (``modes``).

Imports run one way: ``prices``, ``profiles``, ``workload``, ``simulation`` ← ``modes``. May import from
``engine.metering`` (its records and list prices) and numpy; nothing that serves requests.
"""

from engine.cost.prices import CostError

#: Idle lifetime of an instance by default: Lambda reclaims idle execution environments after minutes, never
#: guaranteed (observed from about 5 to 15 minutes); Cloud Run keeps idle instances up to 15 minutes.
IDLE_LIFETIME_S = 600.0

__all__ = ["IDLE_LIFETIME_S", "CostError"]
