"""Feedback controllers: PI for JouleSched's lambda, MIAD for GPU clocks.

* :class:`PIController`: lambda (J per second late) steered so the pool's
  deadline-miss ratio tracks its target (docs/architecture.md 1.2);
* :class:`MIADController`: one GPU's SM clock (MHz), raised x ``k_inc`` when the
  period's :class:`SLOSignal` is at risk, lowered by ``step_mhz`` otherwise;
  :func:`miad_signal` builds that signal from an engine's metrics over the period
  (:class:`PeriodLatencies`, seconds or fractions of the SLO), :func:`held_slo` picks
  the SLO a GPU serving several pools answers to, and :func:`prefill_clock_floor` the
  lowest clock at which a pool's long prompts still get their first token in time
  (docs/architecture.md 1.5). The node agent and the simulator call these alike.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from joulepool.core.profiles import DEFAULT_HEADROOM, Headroom


@dataclass
class PIController:
    """Tunes lambda so the deadline-miss rate tracks ``target`` (JouleSched 3.2).

    Velocity (incremental) form of a PI controller:

        lambda += Kp * (e_t - e_{t-1}) + Ki * e_t,   e = rho - rho*

    clamped to [lam_min, lam_max]. This is the textbook discrete PI
    (lambda = Kp*e + Ki*sum(e)) written as an update. JouleSched prints
    ``lambda += Kp*e_t + Ki*sum(e)``, which integrates the error twice: two
    periods of misses then push lambda up for hundreds of on-time periods.
    The velocity form keeps no error sum, so clamping lambda is all the
    anti-windup it needs: lambda leaves a bound the period the error turns.
    """

    kp: float = 20.0
    ki: float = 200.0
    target: float = 0.01
    lam_min: float = 0.0
    lam_max: float = 1e4
    lam: float = 10.0
    last_error: float | None = None

    def __post_init__(self) -> None:
        if not self.lam_min <= self.lam_max:
            raise ValueError("lam_min must be <= lam_max")
        if not 0.0 <= self.target <= 1.0:
            raise ValueError("target miss rate must be in [0, 1]")
        if not (self.kp >= 0 and self.ki >= 0):  # NaN gains fail here too
            raise ValueError("PI gains must be >= 0")
        if math.isnan(self.lam) or math.isnan(self.lam_min) or math.isnan(self.lam_max):
            raise ValueError("lambda and its bounds must be numbers (NaN given)")
        self.lam = min(max(self.lam, self.lam_min), self.lam_max)

    def update(self, miss_rate: float) -> float:
        """Feed one period's observed miss rate; return the new lambda."""
        err = float(miss_rate) - self.target
        prev = err if self.last_error is None else self.last_error
        raw = self.lam + self.kp * (err - prev) + self.ki * err
        self.last_error = err
        self.lam = min(max(raw, self.lam_min), self.lam_max)
        return self.lam


class Direction(StrEnum):
    UP = "up"
    DOWN = "down"
    HOLD = "hold"


@dataclass(frozen=True)
class SLOSignal:
    """What MIAD looks at each period (s; or fractions of the SLO where the caller divides
    by it), built by :func:`miad_signal` from the period's :class:`PeriodLatencies`."""

    #: the TTFT tail of the first tokens in the period (None: no first token)
    ttft_tail_s: float | None
    #: the TPOT compared with the target: the period's mean inter-token latency
    #: (:attr:`PeriodLatencies.mean_itl`), or the period's length when requests stalled
    #: (None: no gap completed and nothing stalled)
    mean_itl_s: float | None
    #: requests waiting for admission
    waiting: int


@dataclass(frozen=True)
class PeriodLatencies:
    """What one engine's latency metrics show over one MIAD period: the observables MIAD
    reads, in one unit (seconds, or fractions of the SLO where the caller divides by it).

    The node agent takes them from the engine's Prometheus page: the increments of the
    inter-token-latency histogram's ``_sum`` and ``_count`` since the previous scrape, the
    TTFT histogram's tail over its window, the waiting gauge. The simulator computes the
    same quantities from its engine state: what those metrics would show.
    """

    #: increase of the ITL histogram's ``_sum`` over the period (gaps between two output
    #: tokens of a request, summed)
    itl_sum: float = 0.0
    #: increase of its ``_count``: the gaps observed (one per output token after a
    #: request's first, so a step gives one to every request it decodes)
    itl_count: float = 0.0
    #: tail time to first token of the requests that got their first token (None: none)
    ttft_tail: float | None = None
    #: requests waiting for admission at the end of the period
    waiting: int = 0
    #: when requests were running at both ends of the period and no gap completed: the
    #: period's length, in ``itl_sum``'s unit (a lower bound of the gap in progress);
    #: 0 otherwise
    stalled: float = 0.0

    @property
    def mean_itl(self) -> float | None:
        """The period's mean inter-token latency, ``itl_sum / itl_count`` (None when no
        token after a first was produced)."""
        return self.itl_sum / self.itl_count if self.itl_count > 0.0 else None


def miad_signal(period: PeriodLatencies) -> SLOSignal:
    """MIAD's signal from one period's observables (:class:`PeriodLatencies`): TTFT tail
    and queue as observed; TPOT: the period's mean inter-token latency.

    A request's TPOT is the mean of its own gaps, so the mean gap of the requests
    decoding in the period is the TPOT they accrue now; one long mixed prefill step is a
    small part of it, while the ITL histogram's *tail* is that step and holds the clock
    high for nothing. The simulator's MIAD and the node agent's both call this; why this
    observable and no other (finished requests' TPOT, per-request projections):
    docs/architecture.md 1.5.

    A period in which requests ran and no gap completed (a step longer than the period,
    a stalled engine) reads TPOT as at least the period (``stalled``), not as no
    signal: MIAD would otherwise lower the clock under requests that wait for a token.
    """
    tpot = period.mean_itl
    if tpot is None and period.stalled > 0.0:
        tpot = period.stalled
    return SLOSignal(period.ttft_tail, tpot, max(int(period.waiting), 0))


#: FREESH's MIAD control period, seconds (the node agent's default)
MIAD_PERIOD_S = 1.0
#: seconds of first tokens MIAD's TTFT tail looks back over (the node agent's
#: ``--window``, the simulator's ``miad_ttft_window_s``); 0, or anything up to one
#: period: the first tokens since the previous period, as the TPOT side
MIAD_TTFT_WINDOW_S = 0.0
#: the quantile MIAD's TTFT tail is read at: the worst first token (the node agent reads it
#: from the engine's histogram as the upper bound of the bucket holding it)
MIAD_TTFT_QUANTILE = 1.0


@dataclass
class MIADController:
    """FREESH's MIAD clock control: multiplicative increase, additive decrease.

    At risk (:class:`SLOSignal`'s TTFT tail or TPOT, the period's mean inter-token
    latency, above target * (1 - margin), or anything waiting):
    f <- min(f_max, f * k_inc). Otherwise f <- max(f_min, f - step).
    The result is snapped to a supported clock: up when raising, down when
    lowering, so a decision always moves at least one supported step.
    """

    supported_mhz: Sequence[float]
    ttft_target_s: float
    tpot_target_s: float
    k_inc: float = 1.5
    step_mhz: float = 30.0
    margin: float = 0.1
    f_min_mhz: float | None = None
    f_max_mhz: float | None = None
    clocks: list[float] = field(init=False)

    def __post_init__(self) -> None:
        if len(self.supported_mhz) == 0:
            raise ValueError("MIAD needs at least one supported clock")
        if self.k_inc <= 1.0 or self.step_mhz <= 0 or not 0.0 <= self.margin < 1.0:
            raise ValueError("need k_inc > 1, step > 0 and 0 <= margin < 1")
        lo = self.f_min_mhz if self.f_min_mhz is not None else min(self.supported_mhz)
        hi = self.f_max_mhz if self.f_max_mhz is not None else max(self.supported_mhz)
        self.clocks = sorted({float(c) for c in self.supported_mhz if lo <= c <= hi})
        if not self.clocks:
            raise ValueError(f"no supported clock within [{lo}, {hi}] MHz")

    @property
    def lowest(self) -> float:
        return self.clocks[0]

    @property
    def highest(self) -> float:
        return self.clocks[-1]

    def snap_up(self, f: float) -> float:
        i = bisect.bisect_left(self.clocks, f - 1e-9)
        return self.clocks[min(i, len(self.clocks) - 1)]

    def snap_down(self, f: float) -> float:
        i = bisect.bisect_right(self.clocks, f + 1e-9) - 1
        return self.clocks[max(i, 0)]

    def at_risk(self, signal: SLOSignal) -> bool:
        limit = 1.0 - self.margin
        if signal.waiting > 0:
            return True
        if signal.ttft_tail_s is not None and signal.ttft_tail_s > self.ttft_target_s * limit:
            return True
        return signal.mean_itl_s is not None and signal.mean_itl_s > self.tpot_target_s * limit

    def step(self, current_mhz: float, signal: SLOSignal) -> tuple[float, Direction]:
        """One control period: the next clock and which way it moved."""
        return self.next_clock(current_mhz, self.at_risk(signal))

    def next_clock(self, current_mhz: float, at_risk: bool) -> tuple[float, Direction]:
        """:meth:`step` once :meth:`at_risk` has read the signal: a function of the
        current clock and that verdict alone (a caller stepping many engines may keep
        its answers)."""
        f = min(max(current_mhz, self.lowest), self.highest)
        if at_risk:
            nxt = self.snap_up(min(self.highest, f * self.k_inc))
            if nxt <= f and f < self.highest:
                nxt = self.snap_up(f + 1e-6)
        else:
            nxt = self.snap_down(max(self.lowest, f - self.step_mhz))
            if nxt >= f and f > self.lowest:
                nxt = self.snap_down(f - 1e-6) if self.snap_down(f - 1e-6) < f else self.lowest
        if nxt > current_mhz:
            return nxt, Direction.UP
        if nxt < current_mhz:
            return nxt, Direction.DOWN
        return nxt, Direction.HOLD


def held_slo(slos: Iterable[tuple[float, float]]) -> tuple[float, float] | None:
    """(TTFT, TPOT) s MIAD holds one engine to: the tightest of the SLOs (each
    ``(TTFT, TPOT)`` s) of the pools whose requests that engine serves, and only theirs
    (a GPU's clock answers to the requests on it, not to another engine's pool on the
    same node); None when it serves none, or when every SLO given is (inf, inf), i.e.
    bounds nothing. The node agent reads a pod's pools from the
    plan (``PlanDocument.held_slo``), the simulator an instance's from its classes
    (docs/architecture.md, "Which SLO a GPU's clock answers to")."""
    ttft = tpot = math.inf
    for t, p in slos:
        ttft, tpot = min(ttft, t), min(tpot, p)
    return None if math.isinf(ttft) and math.isinf(tpot) else (ttft, tpot)


def miad_step_target_s(tpot_slo_s: float, margin: float = MIADController.margin) -> float:
    """s: the mean decode step (inter-token latency) MIAD holds an engine at, as the
    clock follows the load: (1 - ``margin``) x ``tpot_slo_s``. The routing rule reads
    each batch's decode energy at the clock that meets it
    (``core.routing.excess_at_needed_clock``)."""
    return (1.0 - margin) * tpot_slo_s


def prefill_clock_floor(prefill_s_at: Callable[[float], float], clocks_mhz: Sequence[float],
                        ttft_s: float, margin: float = 0.1) -> float:
    """MHz: the lowest of ``clocks_mhz`` at which a prompt still gets its first token
    within (1 - ``margin``) x ``ttft_s``, where ``prefill_s_at(f)`` is that prompt's time
    to first token in s at clock f (MHz): ``core.batching.unqueued_first_token_s``
    beside the engine's running batch, for the simulator and the node agent; the highest
    clock when none does.

    MIAD lowers the clock while the latencies it has seen are fine; on sparse traffic
    the next prompt then prefills at a clock that cannot meet its TTFT, and MIAD only
    learns it from that miss. Holding MIAD at or above this floor, for the prompt
    lengths the instance serves, keeps it from trading first tokens for joules.
    """
    ordered = sorted(float(c) for c in clocks_mhz)
    if not ordered:
        raise ValueError("no clocks")
    limit = (1.0 - margin) * ttft_s
    for f in ordered:
        if prefill_s_at(f) <= limit:
            return f
    return ordered[-1]



def prefill_floor_quantile(headroom: Headroom = DEFAULT_HEADROOM) -> float:
    """The quantile of a pool's prompt lengths :func:`prefill_clock_floor` is taken at:
    all but the share of first tokens the planner's headroom lets miss
    (``Headroom.ttft_miss``). The simulator's MIAD and the node agent's both use it."""
    return 1.0 - headroom.ttft_miss.value
