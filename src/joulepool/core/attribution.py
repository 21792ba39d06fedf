"""Attribute measured GPU energy to the work on the GPU: per pool, served model and site.

The node agent meters each GPU's energy (NVML counter, or integrated power)
and knows, through the kubelet PodResources API, which engine container uses
which GPU and so which pool and model it serves.  :func:`attribute` turns one
period's per-GPU energy into energy and carbon per :class:`Work`; counters of
these (``joulepool_pool_energy_joules_total``, ``..._carbon_grams_total``,
``..._output_tokens_total``) make J/token and gCO2/token one PromQL division.

Rules: a GPU's energy is split equally among the engines that use it (an
engine over several GPUs gets a share of each); energy of a GPU no engine
uses is *idle* and attributed to no pool (it stays visible as the GPU total
minus the pools' sum).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from joulepool.core.energy import grams_co2


@dataclass(frozen=True, order=True)
class Work:
    """Who an engine works for: pool key (``namespace.name``), served model, site."""

    pool: str
    model: str
    site: str


@dataclass
class Share:
    """Energy (J) and emissions (gCO2) of one :class:`Work` over a period."""

    joules: float = 0.0
    grams_co2: float = 0.0


def attribute(
    gpu_joules: Mapping[str, float],
    users: Mapping[str, Sequence[Work]],
    g_per_kwh: float | None,
) -> tuple[dict[Work, Share], float]:
    """Per-GPU energy of one period (J, GPU id -> J) to the work using each GPU.

    ``users[gpu]``: the work of each engine using that GPU (a Work may repeat
    when two engines of one pool share it).  ``g_per_kwh``: the site's grid
    intensity, None when unknown (grams stay 0).  Returns the shares and the
    idle energy (J of GPUs nobody uses).  Negative or non-finite energy is a
    ValueError: callers pass deltas of monotonic counters.
    """
    shares: dict[Work, Share] = {}
    idle = 0.0
    for gpu, joules in gpu_joules.items():
        if not joules >= 0 or joules == float("inf"):
            raise ValueError(f"GPU {gpu}: energy must be finite and >= 0, got {joules!r}")
        work = users.get(gpu) or ()
        if not work:
            idle += joules
            continue
        part = joules / len(work)
        for w in work:
            s = shares.setdefault(w, Share())
            s.joules += part
            if g_per_kwh is not None:
                s.grams_co2 += grams_co2(part, g_per_kwh)
    return shares, idle
