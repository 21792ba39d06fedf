"""Inputs of the JouleSched cost for a live endpoint or node, and the ranking rule.

These are the small formulas the request router and the scheduler extender
need around :mod:`joulepool.core.cost`; they live here so the simulator uses
the same ones. The request router (``core/router.py``, run by ``joulepool router``) and the
simulator's JouleSched policies (``sim/engine.py``) both score endpoints with
:func:`score_endpoints` and pick with :func:`rank_endpoints`: one rule.

Endpoint scoring rule (request routing):
    op_n    = the endpoint's operating batch: the largest batch whose decode step meets
              the pool's TPOT SLO (at least 1), the batch the extender's placement sizes
              replicas at (:func:`replica_point`; :attr:`EndpointModel.op_batch`)
    b*_n    = requests it carries at once within the SLO: the mean decode batch at
              the serving model's sustainable rate for the pool's mean prompt and
              response (:func:`sustainable_batch`, the point the planner sizes pools
              at), per member at the mix it holds (:func:`member_rooms`), 0 where no
              batch keeps TPOT (:func:`tpot_gate`, :func:`gated_room`); op_n when the
              pool's mix is not known (:attr:`EndpointModel.carry_batch`)
    X_n(b)  = (P_n(b) - P_idle,n) * s_n(b): the energy one decode step at batch b
              draws above idle (P power, s step time, both from the profile at the
              endpoint's clock: a fixed one, or where the clock follows the load (MIAD)
              the lowest clock whose step meets MIAD's TPOT target at that batch, so a
              batch that needs a higher clock costs every request in it that clock;
              X_n(0) = 0)          (:func:`excess_step_j`, :func:`excess_at_needed_clock`)
    k_n     = requests in flight there now (routed, unfinished)
    eps_n   = the marginal decode energy per output token of joining now
              (:func:`marginal_decode_j_per_token`):
                  X_n(k+1) - X_n(k)      while k < b*_n (join the running batch;
                                         k = 0 wakes an idle instance: X_n(1))
                  X_n(b*_n) / b*_n       once the batch is full (the request waits
                                         for a slot and takes its share of a full step)
              x scale_n (core.online.EpsEstimator)
              x g_n / mean g over the pool on a carbon-objective cluster (g_n its
              site's grid intensity: the rule then ranks marginal carbon;
              :func:`carbon_weights`); so are pi_n and X_n(1) below
    pi_n    = (P_prefill,n - P_idle,n) * prefill s per prompt token: the prefill
              energy per prompt token (:func:`prefill_excess_j_per_token`)
    R_n     = decode steps the requests in flight there have left (the longest; 0 idle)
    E_n(r)  = eps_n * min(output_r, R_n) + X_n(1) * max(0, output_r - R_n)
              + pi_n * prompt_r: the steps it runs beyond the running batch's
              are steps that batch would not have run   (:func:`marginal_energy_j`)
    mu_n    = profile.decode_tokens_per_s(op_n)           (at the current clock where known)
    w_n     = mu_n * prefill_s_per_token_n                (:func:`prefill_weight`: decode
              tokens the endpoint forgoes while it prefills one prompt token)
    q_n     = decode tokens ahead + w_n * prompt tokens ahead (not yet prefilled)
              + w_n * the request's own prompt            (:func:`endpoint_queue_tokens`,
                                                           :func:`score_endpoints`)
    t_r     = output_tokens + input_weight * input_tokens (input_weight = 0: the paper's t_r)
    ETA     = (q_n + t_r) / mu_n, cost = E_n(r) + lambda * max(0, ETA - D_r)
              (:func:`joulepool.core.cost.joulesched_cost`)
    first_n = the request's predicted first token: the wait for the engine's prefill
              queue (one prompt at a time, each in chunked steps that carry the
              batch's decode) and a batch slot, then its own prefill
              (:func:`prefill_queue`, :func:`first_token_s`)
    late_n  = first_n > TTFT SLO, or no room within b*_n   (:func:`slo_infeasible`)
    choice  = among the endpoints not late: lowest cost, then lowest ETA, then lowest
              index; when all are late: the endpoints within their TPOT batch first
              (borrowed shared instances of a tighter TTFT after the rest), or, when
              none is, least-loaded's score (outstanding + 1) / capacity; ties to the
              soonest first token        (:func:`overflow_rank`, :func:`rank_endpoints`)

Why above idle: an instance holds its GPUs whether or not it serves, so what a
request adds is the draw above idle for as long as it keeps the instance
busier; a prompt chunk lengthens the step it rides in by its own prefill time
at prefill power, so the decode it rides with costs nothing extra. Summed over
the requests of a run these increments telescope to the instance's busy energy
above idle (the simulator's ledger checks this within 10 %,
``tests/unit/test_marginal_energy.py``).

Why the marginal energy cannot pile every request onto the busiest endpoint
(the fault of eps read at the live batch): the decrement stops at b*_n, past
which a request pays its full share of a full step, and mu_n stays the
operating batch's rate, so a crowded endpoint's ETA grows with its queue and
the lateness term takes over. Below b*_n joining a running batch is genuinely
cheaper than waking an idle instance, which is what consolidation exploits.
See docs/marginal-energy.md.

The decode tokens ahead are the router's ledger of routed, unfinished tokens
or the estimate from scraped request counts (:func:`queue_tokens_estimate`),
whichever is larger; the simulator keeps the same ledger per instance.
Prompt tokens ahead are those of requests not yet admitted: the simulator
sums them exactly, the router estimates them from counts
(:func:`waiting_requests_estimate`) x the mean prompt it has seen. Profile
drift is measured against eps at the batch the endpoint actually ran
(:meth:`EndpointModel.at`), so the online scale carries drift, not load.

Node (pod placement, the form :func:`joulepool.core.cost.placement_cost` takes):
    the replica runs at the largest batch meeting the pool's TPOT SLO
    (:func:`replica_point`; the planner sizes pools at the serving model's
    sustainable rate instead, :meth:`ServingProfile.serving_point`);
    capacity = instances that fit x tokens/s per instance;
    replica = the plan's mean instance tokens/s x utilisation (the same for every
              node, so the energy terms compare like with like);
    load = GPUs held by bound pods, as instances at that utilisation
           + tokens queued on the node's endpoints / horizon.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt
from scipy.stats import poisson

# default_deadline lives in core.classes (next to SLO.deadline_for); re-exported here
# for the router and older callers
from joulepool.core.batching import first_token_after_s, prefill_steps
from joulepool.core.classes import default_deadline as default_deadline
from joulepool.core.cost import (
    CostBreakdown,
    Scratch,
    float_array,
    joulesched_cost,
    joulesched_cost_one,
)
from joulepool.core.profiles import (
    DEFAULT_HEADROOM,
    Headroom,
    ServingProfile,
    default_batched_tokens,
)

FloatArray = npt.NDArray[np.float64]
#: a float or an array of them: the small formulas below are plain arithmetic so the
#: simulator can apply them to one instance's floats and the router to whole arrays
Num = TypeVar("Num", float, FloatArray)
#: a batch size: whole requests (the simulator) or a float column's entry (the router)
Batch = TypeVar("Batch", int, float)


def queued_responses(waiting: npt.ArrayLike, running: npt.ArrayLike) -> FloatArray:
    """Responses ahead of a new request, in whole responses: waiting requests count
    whole, running ones half (they are half done on average)."""
    w = np.maximum(np.asarray(waiting, dtype=np.float64), 0.0)
    r = np.maximum(np.asarray(running, dtype=np.float64), 0.0)
    return np.asarray(w + r / 2.0, dtype=np.float64)


def queue_tokens_estimate(
    waiting: npt.ArrayLike, running: npt.ArrayLike, mean_output_tokens: float
) -> FloatArray:
    """Tokens ahead of a new request on an engine with these request counts."""
    m = max(float(mean_output_tokens), 0.0)
    return np.asarray(queued_responses(waiting, running) * m, dtype=np.float64)


def waiting_requests_estimate(
    waiting: npt.ArrayLike, in_flight: npt.ArrayLike, max_batch: npt.ArrayLike
) -> FloatArray:
    """Requests not yet admitted to the batch: the scraped waiting count, or what
    the requests in flight (e.g. the router's ledger) imply beyond the engine's
    batch limit, if more."""
    over: FloatArray = np.asarray(np.subtract(in_flight, max_batch, dtype=np.float64))
    np.maximum(over, waiting, out=over)
    np.maximum(over, 0.0, out=over)
    return over


def waiting_requests_one(waiting: float, in_flight: float, max_batch: float) -> float:
    """:func:`waiting_requests_estimate` of one endpoint, with the same operations (NaN
    where ``waiting`` or the excess is NaN, as ``np.maximum``), so the same number: for
    a caller that keeps the column up to date one row at a time
    (``tests/unit/test_core_fast_paths.py`` holds the two together)."""
    over = in_flight - max_batch
    if over != over or waiting != waiting:
        return math.nan
    if waiting > over:
        over = waiting
    return over if over > 0.0 else 0.0


def prefill_weight(tps: Num, prefill_s_per_token: Num) -> Num:
    """w_n: decode tokens an endpoint running at ``tps`` forgoes while it prefills one
    prompt token (a prompt chunk lengthens the mixed step every decoding request waits
    for by its prefill time); prompt tokens x w_n are decode-token
    equivalents, so the cost's ETA = (q + t) / mu counts prefill time too."""
    return tps * prefill_s_per_token


def endpoint_queue_tokens(decode_tokens: Num, prompt_tokens: Num, weight: Num) -> Num:
    """q_n before the request: decode tokens ahead plus prompt tokens ahead (not yet
    prefilled) in decode-token equivalents (``weight`` from :func:`prefill_weight`)."""
    return decode_tokens + weight * prompt_tokens


def excess_step_j(power_w: npt.ArrayLike, idle_w: float, step_s: npt.ArrayLike) -> FloatArray:
    """X(b): joules one decode step draws above idle, (P(b) - P_idle) * s(b)."""
    p = np.asarray(power_w, dtype=np.float64)
    return np.asarray((p - idle_w) * np.asarray(step_s, dtype=np.float64), dtype=np.float64)


def prefill_excess_j_per_token(prefill_power_w: npt.ArrayLike, idle_w: float,
                               prefill_s_per_token: npt.ArrayLike) -> FloatArray:
    """pi: joules above idle per prompt token prefilled."""
    p = np.asarray(prefill_power_w, dtype=np.float64)
    return np.asarray((p - idle_w) * np.asarray(prefill_s_per_token, dtype=np.float64),
                      dtype=np.float64)


def excess_at_needed_clock(itl_s: npt.ArrayLike, excess_j: npt.ArrayLike,
                           step_target_s: float) -> FloatArray:
    """X(b) on an endpoint whose clock follows its load: for each batch b, :func:`excess_step_j`
    at the lowest clock whose decode step meets ``step_target_s`` (the top clock when none
    does).

    ``itl_s`` and ``excess_j`` are tables [clock, batch], clocks ascending (the profile's
    step time and X at every supported clock). A clock controller (MIAD) holds the step
    near its TPOT target, so a batch that grows past what a clock keeps within the
    target raises the clock, and every request in the batch pays the higher clock's
    power: X_n(k+1) - X_n(k) from this row counts that rise, which the row at one fixed
    clock (f_max) hides (docs/experiments/marginal-energy.md, "Dominated cells")."""
    itl = np.asarray(itl_s, dtype=np.float64)
    x = np.asarray(excess_j, dtype=np.float64)
    ok = itl <= step_target_s
    clock = np.where(ok.any(axis=0), ok.argmax(axis=0), itl.shape[0] - 1)
    return np.asarray(x[clock, np.arange(x.shape[1])], dtype=np.float64)


def marginal_decode_j_per_token(excess: Sequence[float] | FloatArray, in_flight: float,
                                op_batch: int) -> float:
    """eps_n: decode joules per output token a request adds joining ``in_flight`` others.

    ``excess[b]`` is :func:`excess_step_j` at batch b (``excess[0]`` = 0, idle),
    ``op_batch`` b*_n, the requests the endpoint carries at once within the SLO
    (:attr:`EndpointModel.carry_batch`: :func:`sustainable_batch`, else the operating
    batch). Below it
    the request joins the running batch: X(k+1) - X(k) per step it stays (k = 0:
    waking an idle instance costs X(1)); from it on the request waits for a slot
    and takes its share of a full step, X(b*) / b*. Scalar, for the event loop.
    """
    k = int(in_flight) if in_flight > 0 else 0
    if k < op_batch:
        return float(excess[k + 1] - (excess[k] if k > 0 else 0.0))
    return float(excess[op_batch] / op_batch)


def marginal_energy_j(eps_j_per_token: npt.ArrayLike, prefill_j_per_token: npt.ArrayLike,
                      output_tokens: float, input_tokens: float,
                      wake_j_per_token: npt.ArrayLike | None = None,
                      batch_left_tokens: npt.ArrayLike | None = None,
                      out: Scratch | None = None) -> FloatArray:
    """E_n(r): joules the request adds on each endpoint, above idle.

    A decoding request adds to every step it is in the batch; the steps the
    running batch would run anyway cost it the join increment eps_n, the steps
    it runs beyond them (the batch would have ended, or the endpoint is idle)
    the whole step of a batch of one, X_n(1) (the wake):

        E_n(r) = eps_n * min(out, R_n) + X_n(1) * max(0, out - R_n) + pi_n * prompt

    ``batch_left_tokens`` R_n: decode steps the requests in flight there have left
    (the longest of them; 0 on an idle endpoint); ``wake_j_per_token`` X_n(1).
    Summed over a run these increments telescope to the busy energy above idle
    (every step is paid by the requests in it), which the simulator's ledger checks
    (``tests/unit/test_marginal_energy.py``). Without them: eps_n * out + pi_n * prompt.
    With ``out`` (every column an array of its length) the result is written into its
    ``energy`` (``spare`` holds the terms before they are added).
    """
    o = max(float(output_tokens), 0.0)
    energy = spare = None
    if out is not None:
        energy, spare = out.energy, out.spare
    # numpy's ufuncs take the columns as they come (arrays or sequences of numbers)
    if wake_j_per_token is None or batch_left_tokens is None:
        e: FloatArray = np.multiply(eps_j_per_token, o, out=energy)
    else:
        joined = np.minimum(batch_left_tokens, o, out=spare)
        e = np.multiply(eps_j_per_token, joined, out=energy)
        beyond = np.subtract(o, joined, out=spare)  # the steps beyond the running batch's
        e += np.multiply(wake_j_per_token, beyond, out=spare)
    if input_tokens > 0:
        e += np.multiply(prefill_j_per_token, float(input_tokens), out=spare)
    return e


def wake_energy_j(profile: ServingProfile, input_tokens: float, output_tokens: float,
                  clock_mhz: float | None = None) -> float:
    """J above idle one request adds on an otherwise idle endpoint of ``profile``: its
    prefill (pi x prompt) and its decode at batch one (X(1) per token after the first),
    :func:`marginal_energy_j` with nothing in flight (R_n = 0);
    :func:`steady_request_energy_j` at batch one."""
    x1 = float(excess_step_j(profile.power_w(1, clock_mhz), profile.idle_w,
                             profile.itl_s(1, clock_mhz)))
    pi = float(prefill_excess_j_per_token(profile.prefill_power_w(clock_mhz), profile.idle_w,
                                          profile.prefill_s(1.0, clock_mhz)))
    return float(marginal_energy_j(x1, pi, max(output_tokens - 1.0, 0.0), input_tokens,
                                   wake_j_per_token=x1, batch_left_tokens=0.0))


def steady_batch(profile: ServingProfile, decode_tokens_per_s: float,
                 clock_mhz: float | None = None) -> float:
    """The mean decode batch b of an instance of ``profile`` asked for
    ``decode_tokens_per_s`` decode tokens per second: b / itl(b) = that rate (Little's
    law: requests decoding = their rate x their decode time), at least 1 (a lone request
    decodes at batch one however rarely requests come) and at most the batch that
    saturates the instance (``max_batch``). Prefill pauses are not counted (they only
    lengthen decode lives, so the batch is if anything larger)."""
    batches = np.arange(1.0, float(int(profile.max_batch.value)) + 1.0)
    tps = np.asarray(profile.decode_tokens_per_s(batches, clock_mhz), dtype=np.float64)
    rate = float(decode_tokens_per_s)
    if not rate > tps[0]:  # also NaN: a batch of one
        return 1.0
    if rate >= tps[-1]:
        return float(batches[-1])
    # decode throughput grows with the batch (step time is linear in b with a fixed part)
    return float(np.interp(rate, tps, batches))


def steady_request_energy_j(profile: ServingProfile, input_tokens: float,
                            output_tokens: float, batch: float = 1.0,
                            clock_mhz: float | None = None) -> float:
    """J above idle one request adds on an endpoint of ``profile`` that decodes at a
    steady batch ``batch`` (>= 1): its prefill (pi x prompt) and its share of every decode
    step it is in, X(b) / b per token after the first, :func:`marginal_energy_j` with
    eps_n = X(b) / b, the rule's price once a batch is full. Summed over the requests
    of a steady run this is the instance's busy energy above idle, what the simulator's
    ledger charges (``tests/unit/test_marginal_energy.py``). At batch one it is
    :func:`wake_energy_j`. The planner charges it per request on a shared instance at the
    batch the share group's demand reaches there (``core.problem``, docs/planner.md,
    "Shared instances")."""
    b = max(float(batch), 1.0)
    if b == 1.0:
        return wake_energy_j(profile, input_tokens, output_tokens, clock_mhz)
    xb = float(excess_step_j(profile.power_w(b, clock_mhz), profile.idle_w,
                             profile.itl_s(b, clock_mhz)))
    pi = float(prefill_excess_j_per_token(profile.prefill_power_w(clock_mhz), profile.idle_w,
                                          profile.prefill_s(1.0, clock_mhz)))
    return float(marginal_energy_j(xb / b, pi, max(output_tokens - 1.0, 0.0), input_tokens))


def marginal_energy_floor(eps_j_per_token: float, prefill_j_per_token: float,
                          output_tokens: float, input_tokens: float,
                          wake_j_per_token: float) -> float:
    """A lower bound of one endpoint's :func:`marginal_energy_j` whatever its R_n >= 0.

    E_n(r) = eps_n * j + X_n(1) * (out - j) + pi_n * prompt with j = min(R_n, out) in
    [0, out] is at least min(eps_n, X_n(1)) * out + pi_n * prompt. The bound is lowered
    by 1e-9 of its terms' magnitude, far more than the rounding of either side, so it
    stays at or below the value :func:`marginal_energy_j` computes. -inf (no bound)
    where an input is NaN or the bound is not finite. A caller scoring many endpoints of
    the same eps_n, X_n(1) and pi_n can skip them all when this exceeds a cost it has.
    (:func:`marginal_energy_floors` for one endpoint.)
    """
    return marginal_energy_floors(
        ((eps_j_per_token, prefill_j_per_token, wake_j_per_token),), output_tokens,
        input_tokens)[0]


def marginal_energy_floors(energies: Iterable[tuple[float, float, float]],
                           output_tokens: float, input_tokens: float) -> list[float]:
    """:func:`marginal_energy_floor` of one request for each (eps_n, pi_n, X_n(1)) of
    ``energies``, in their order: the request's terms are read once for all of them
    (the simulator's candidate search bounds every energy group of a pool per request).
    """
    # (comparisons, not min()/max()/abs() calls: the simulator calls this per request)
    out = float(output_tokens)
    if out < 0.0:
        out = 0.0
    has_prompt = input_tokens > 0
    prompt_tokens = float(input_tokens) if has_prompt else 0.0
    floors = []
    for eps, pi, wake in energies:
        if eps != eps or wake != wake:
            floors.append(-math.inf)
            continue
        low, high = (eps, wake) if eps < wake else (wake, eps)
        if -low > high:  # the larger magnitude of the two
            high = -low
        floor = low * out
        scale = high * out
        if has_prompt:
            prompt = pi * prompt_tokens
            floor += prompt
            scale += prompt if prompt >= 0.0 else -prompt
        floor -= 1e-9 * scale
        floors.append(floor if -math.inf < floor < math.inf else -math.inf)
    return floors


def score_endpoint(eps_j_per_token: float, queue_tokens: float, throughput_tps: float,
                   weight: float, tokens: float, input_tokens: float, deadline_s: float,
                   lam: float, prefill_j_per_token: float, output_tokens: float,
                   wake_j_per_token: float, batch_left_tokens: float) -> tuple[float, float]:
    """:func:`score_endpoints` (with the marginal energy: every column given) for one
    endpoint: (cost, ETA s).

    The same floating-point operations in the same order as the vectorised form, so
    the same numbers bit for bit, NaN and infinities included
    (``tests/unit/test_core_fast_paths.py``): for callers that score a few endpoints
    one at a time (the simulator's candidate search, ``sim/candidates.py``).
    """
    q = queue_tokens + weight * float(input_tokens) if input_tokens > 0 else queue_tokens
    # marginal_energy_j
    out = max(float(output_tokens), 0.0)
    joined = out if out <= batch_left_tokens else batch_left_tokens  # np.minimum: NaN stays
    energy = eps_j_per_token * joined
    energy += wake_j_per_token * (out - joined)
    if input_tokens > 0:
        energy += prefill_j_per_token * float(input_tokens)
    return joulesched_cost_one(q, throughput_tps, tokens, deadline_s, lam, energy)


def score_endpoints(
    eps_j_per_token: npt.ArrayLike,
    queue_tokens: npt.ArrayLike,
    throughput_tps: npt.ArrayLike,
    weight: npt.ArrayLike,
    tokens: float,
    input_tokens: float,
    deadline_s: float,
    lam: float,
    prefill_j_per_token: npt.ArrayLike | None = None,
    output_tokens: float | None = None,
    wake_j_per_token: npt.ArrayLike | None = None,
    batch_left_tokens: npt.ArrayLike | None = None,
    out: Scratch | None = None,
) -> CostBreakdown:
    """The JouleSched cost of a request on every endpoint under the rule above.

    ``eps_j_per_token`` is eps_n (J per output token), ``throughput_tps`` mu_n at the
    operating batch, ``queue_tokens`` q_n from :func:`endpoint_queue_tokens`, ``weight``
    w_n; the request's own prompt of ``input_tokens`` is added to q_n here. With
    ``prefill_j_per_token`` (pi_n) the energy term is :func:`marginal_energy_j` of
    ``output_tokens`` (default ``tokens``) and the prompt (with ``wake_j_per_token``
    X_n(1) and ``batch_left_tokens`` R_n, the steps beyond the running batch's at the
    wake cost); without it eps_n * t_r. With ``out`` (:class:`~joulepool.core.cost.Scratch`
    of the columns' length, every column an array) the terms are written into it
    (``eta``, ``energy``, ``slack``, ``cost``; ``spare`` in between), none allocated.
    """
    q = queue_tokens
    if input_tokens > 0:
        # queue + weight x prompt (the sum in the other order: the same number)
        q = np.multiply(weight, float(input_tokens), out=None if out is None else out.eta)
        q += queue_tokens
    energy = None
    if prefill_j_per_token is not None:
        o = tokens if output_tokens is None else output_tokens
        energy = marginal_energy_j(eps_j_per_token, prefill_j_per_token, o, input_tokens,
                                   wake_j_per_token, batch_left_tokens, out)
    return joulesched_cost(eps_j_per_token, q, throughput_tps, tokens, deadline_s, lam, energy,
                           out)


def request_tokens(
    output_tokens: float, input_tokens: float = 0.0, input_weight: float = 0.0
) -> float:
    """JouleSched's token estimate t_r for a request."""
    return max(float(output_tokens), 0.0) + max(float(input_weight), 0.0) * max(
        float(input_tokens), 0.0
    )


def prefill_queue(
    itl_s: Sequence[float] | FloatArray, prefill_s_per_token: float, budget_tokens: float,
    running: float, waiting: float, waiting_tokens: float, prefill_left_s: float = 0.0,
    mean_output_tokens: float = 0.0,
) -> tuple[float, float, float]:
    """When a new request's prefill would start on an engine, and the step it runs in.

    The engine (vLLM V1, ``sim/instance.py``) prefills one prompt at a time in chunks
    mixed into the decode steps: a step carries the batch's decode tokens and up to
    ``budget - batch`` prompt tokens and takes ``itl(batch) + chunk x prefill_s``, so a
    prompt of ``l`` tokens at batch ``b`` takes ``max(1, l / (budget - b))`` steps:

        T(l, b) = max(1, l / (budget - b)) * itl(b) + l * prefill_s      (itl(0) = 0)

    Every prompt ahead pays its steps' decode time, not only its own prefill, and
    joins the batch when done. So, with ``running`` requests in the engine's batch
    (decoding or prefilling, as vLLM's ``num_requests_running`` counts them),
    ``waiting`` requests of ``waiting_tokens`` prompt tokens queued before it and
    ``prefill_left_s`` of the running prefill left:

        b_q    = running + waiting / 2      (the batch while the queue is prefilled)
        wait   = prefill_left_s + max(waiting, waiting_tokens / (budget - b_q)) * itl(b_q)
                 + waiting_tokens * prefill_s
                 + max(0, running + waiting + 1 - max_batch) * mean_output / tps(max_batch)
                                            (no batch slot: wait for completions)

    ``itl_s[b]`` is the decode step time at batch ``b`` (index 0 unused; its length - 1
    is the engine's ``max_num_seqs``), ``prefill_s_per_token`` the prefill time per
    prompt token, ``budget_tokens`` ``max_num_batched_tokens``; ``mean_output_tokens``
    sizes the wait for a batch slot. Returns (wait s, step s and prompt tokens per
    step of the request's own prefill, at batch ``running + waiting``), the inputs of
    :func:`first_token_s`. Scalar: the simulator calls it per instance with its exact
    state, the router per endpoint with its estimates.
    """
    # (comparisons instead of min()/max() calls: the simulator calls this per event)
    max_b = len(itl_s) - 1
    b = 0  # NaN (not reported): none
    if running > 0:
        b = int(running)
        if b > max_b:
            b = max_b
    wait = float(prefill_left_s)
    if wait < 0.0:  # NaN stays
        wait = 0.0
    if waiting > 0:
        n = float(waiting)
        waiting_tokens = float(waiting_tokens) if waiting_tokens > 0 else 0.0
        bq = b + int(n // 2)
        if bq > max_b:
            bq = max_b
        step = itl_s[bq] if bq > 0 else 0.0
        # core.batching's steps for the queue's prompts, at least one step each
        steps = prefill_steps(budget_tokens, bq, waiting_tokens)
        if not steps > n:
            steps = n
        wait += steps * step + waiting_tokens * prefill_s_per_token
        over = b + n + 1.0 - max_b
        own = b + int(n)
    else:  # nothing waiting (n = 0)
        over = b + 1.0 - max_b
        own = b
    if over > 0.0 and mean_output_tokens > 0.0:
        wait += over * mean_output_tokens * itl_s[max_b] / max_b
    if own > max_b:
        own = max_b
    chunk = budget_tokens - own
    if chunk < 1.0:  # NaN stays
        chunk = 1.0
    return wait, (itl_s[own] if own > 0 else 0.0), chunk


def first_token_s(wait_s: npt.ArrayLike, step_s: npt.ArrayLike, chunk_tokens: npt.ArrayLike,
                  prefill_s_per_token: npt.ArrayLike, input_tokens: float,
                  out: Scratch | None = None) -> FloatArray:
    """Predicted delay to a request's first token on each endpoint, s: the wait before
    its prefill starts plus its own prefill mixed into the decode steps,
    ``wait + max(1, l / chunk) * step + l * prefill_s`` (inputs: :func:`prefill_queue`):
    :func:`joulepool.core.batching.first_token_after_s` over every endpoint at once,
    with the same floating-point operations (so the same values bit for bit). With
    ``out`` (every column an array of its length) written into its ``first``
    (``spare`` in between)."""
    first = spare = None
    if out is not None:
        first, spare = out.first, out.spare
    steps = np.maximum(np.divide(float(input_tokens), chunk_tokens, out=first), 1.0, out=first)
    t = np.add(wait_s, np.multiply(steps, step_s, out=first), out=first)
    t += np.multiply(prefill_s_per_token, float(input_tokens), out=spare)
    return float_array(t)


def slo_infeasible(first_token: npt.ArrayLike, batch_room: npt.ArrayLike,
                   ttft_slo_s: float, out: Scratch | None = None) -> npt.NDArray[np.bool_]:
    """Endpoints predicted to break the request's SLO: its first token (predicted by
    :func:`first_token_s`, s) later than ``ttft_slo_s``, or no room left in the batch
    it can carry within the SLO (joining would stretch every step past TPOT).

    The marginal energy ranks only the endpoints predicted to keep the SLO; this is
    what stops it from filling the cheapest running batch past what it can serve.
    (Lateness against the end-to-end deadline stays a priced, soft term: lambda.) With
    ``out`` (every column an array of its length) written into its ``late``.
    """
    late: npt.NDArray[np.bool_] = np.greater(first_token, ttft_slo_s,
                                             out=None if out is None else out.late)
    late |= np.less(batch_room, 1.0, out=None if out is None else out.spare_bool)
    return late


def endpoint_late(wait_s: float, step_s: float, chunk_tokens: float,
                  prefill_s_per_token: float, batch_room: float, input_tokens: float,
                  ttft_slo_s: float) -> bool:
    """:func:`slo_infeasible` of :func:`first_token_s` for one endpoint
    (``core.batching.first_token_after_s``, the same floating-point operations: the
    same verdict bit for bit, NaN included)."""
    first = first_token_after_s(wait_s, step_s, chunk_tokens, prefill_s_per_token,
                                float(input_tokens))
    return first > ttft_slo_s or batch_room < 1.0


def overflow_rank(outstanding: npt.ArrayLike, tpot_batch: npt.ArrayLike,
                  inv_capacity: npt.ArrayLike,
                  delays_tighter: npt.ArrayLike | None = None) -> FloatArray:
    """Where a request goes when no endpoint is predicted to keep its SLO: a key per
    endpoint, lower first (:func:`rank_endpoints` breaks ties by the first token).

    While some endpoint can take it within its TPOT batch (``outstanding`` + 1 <=
    ``tpot_batch``: :func:`sustainable_batch` without a TTFT bound, prefill mixed into
    the decode steps included; late for the first token or for its TTFT-bound b*, but
    every request's TPOT in time), those rank first (0)
    and the others after (1): a late first token costs that one request, a batch past
    what meets TPOT stretches the step of every request in it. When none can, least-loaded's
    score ``(outstanding + 1) x inv_capacity`` (1 / req/s the endpoint sustains): the
    overflow spreads in proportion to what each endpoint serves within the SLO, as
    least-loaded routing would send it, instead of piling onto the fastest prefill.

    ``delays_tighter`` (True: a shared instance this pool borrows that also serves a
    class with a tighter TTFT than this request's, :func:`delays_tighter_ttft`) ranks
    those after the others
    of the same TPOT group (keys 0 / 1 within TPOT, 2 / 3 past it), and, when no
    endpoint is within TPOT, after every other endpoint: a request late everywhere
    would be late there too, and its prefill would make that class's next first tokens
    late as well (docs/routing.md, "Overflow"). A batch past TPOT still ranks after
    them, since it stretches every step of the batch."""
    joined = np.add(outstanding, 1.0)
    within = np.less_equal(joined, tpot_batch)
    later = None if delays_tighter is None else np.asarray(delays_tighter, dtype=bool)
    if later is not None and not later.any():
        later = None
    if within.any():
        over = float_array(np.logical_not(within))
        return over if later is None else float_array(np.add(np.multiply(over, 2.0), later))
    keys = float_array(np.multiply(joined, inv_capacity))
    if later is None or later.all():
        return keys
    rest = keys[np.logical_not(later)]
    rest = rest[np.isfinite(rest)]
    after = float(rest.max()) + 1.0 if rest.size else 0.0  # past every other key
    return float_array(np.where(later, keys + after, keys))


def delays_tighter_ttft(shared_ttft_s: npt.ArrayLike,
                        ttft_slo_s: float) -> npt.NDArray[np.bool_]:
    """Endpoints whose other classes' tightest TTFT SLO (``shared_ttft_s``, s: on a
    guest's copy of a shared instance; inf on the pool's own endpoints) is below the
    request's ``ttft_slo_s``: its prefill there would delay first tokens that have less
    time than its own (:func:`overflow_rank`'s ``delays_tighter``)."""
    return np.less(shared_ttft_s, ttft_slo_s)


def rank_endpoints(breakdown: CostBreakdown, k: int, hard_deadline: bool = False,
                   late: npt.NDArray[np.bool_] | None = None,
                   first_token: npt.ArrayLike | None = None,
                   overflow: npt.ArrayLike | None = None) -> list[int]:
    """The ``k`` best endpoint indices, best first: lowest cost, then lowest ETA, then
    lowest index (deterministic).

    With ``late`` (e.g. :func:`slo_infeasible`) every endpoint not marked ranks
    before every one marked; with ``hard_deadline``, within each of those groups,
    every endpoint predicted to meet the deadline ranks before every endpoint
    predicted to miss it; cost, ETA and index order within each group, except that
    with ``first_token``
    (predicted first-token delays, :func:`first_token_s`) the marked ones rank by
    the earliest first token, and with ``overflow`` (:func:`overflow_rank`) by it first:
    when no endpoint keeps the SLO the request goes where least-loaded routing would
    send it, the one that serves it soonest among those least overloaded. Endpoints
    with a NaN or infinite cost (cannot serve) are left out.
    """
    cost = float_array(breakdown.cost)
    if cost.size == 0 or k <= 0:
        return []
    eta = float_array(breakdown.eta_s)
    # (ufunc reductions: ndarray.all() adds a Python-level call on this per-request path)
    any_late = some_on_time = True
    if late is None or not _any(late):
        any_late = False
    elif _all(late):
        some_on_time = False
    over = None
    if hard_deadline:
        over = float_array(breakdown.slack_s) > 0
    if k == 1 and some_on_time:  # the simulator's per-request path: no sort
        worse = late
        if over is not None:
            both = over if worse is None else (worse | over)
            worse = both if not _all(both) else worse
        best = _best_outside(cost, eta, worse)
        if best is not None:
            return [best]
    # sort keys, least significant first: ETA, the key within a group, then the groups
    keys: list[npt.NDArray[Any]] = [eta, cost]
    if any_late and late is not None:
        if first_token is not None:  # the late group: soonest first token
            keys[1] = np.where(late, float_array(first_token), cost)
        if overflow is not None:  # the late group: least overloaded before that
            keys.insert(2, np.where(late, float_array(overflow), 0.0))
        if some_on_time:
            keys.append(late)
    by_deadline = False
    if over is not None and _any(over) and not _all(over):
        keys.insert(2, over)  # within the SLO groups: on time first
        by_deadline = True
    # every cost finite (a sum of them is: NaN and infinities carry through the sum, and
    # a finite sum cannot hide one) is the usual case; else look row by row
    usable = None if math.isfinite(_sum(cost)) else np.isfinite(cost)
    top: list[int]
    if usable is None or _all(usable):  # the usual case: rank the arrays as they are
        rows = None if by_deadline or not some_on_time else _cheapest_rows(
            cost, eta, late if any_late else None, k)
        if rows is not None:  # they hold the top k: rank only them
            top = rows[np.lexsort([x[rows] for x in keys])[:k]].tolist()
            return top
        top = np.lexsort(keys)[:k].tolist()
        return top
    assert usable is not None
    idx = np.flatnonzero(usable)
    if idx.size == 0:
        return []
    order = np.lexsort([x[idx] for x in keys])
    top = idx[order[:k]].tolist()
    return top


_any, _all, _sum = np.logical_or.reduce, np.logical_and.reduce, np.add.reduce


#: endpoints from which :func:`rank_endpoints` first narrows them to the cheapest
#: (below, sorting them all is as cheap)
CHEAPEST_ROWS_MIN = 128


def _cheapest_rows(cost: FloatArray, eta: FloatArray, late: npt.NDArray[np.bool_] | None,
                   k: int) -> npt.NDArray[np.intp] | None:
    """Rows (ascending) that hold :func:`rank_endpoints`' top ``k`` when the endpoints
    not marked ``late`` rank by cost, then ETA, then index (no deadline groups; every
    cost finite), so that only they are sorted: at 1,000 endpoints a sort of every row
    costs up to several times the selection. Those are the unmarked rows below the
    k-th lowest unmarked cost and, of those at that cost (a tie, e.g. identical idle
    endpoints), the ones below the ETA that fills the places left, then the lowest
    indices at that ETA. None when fewer than ``k`` rows are unmarked, or the pool is
    small (:data:`CHEAPEST_ROWS_MIN`): the caller sorts them all."""
    if cost.size < CHEAPEST_ROWS_MIN or k >= cost.size:
        return None
    on_time = cost if late is None else np.where(late, np.inf, cost)
    part = on_time.copy()
    part.partition(k - 1)
    kth = part[k - 1]
    if not kth < math.inf:  # fewer than k unmarked rows
        return None
    rows: npt.NDArray[np.intp] = (on_time <= kth).nonzero()[0]
    if rows.size <= k:
        return rows
    # every row cheaper than the k-th is among the k - 1 the partition put before it;
    # none (the k lowest all tie, e.g. identical idle endpoints): every row is a tie
    if any(c < kth for c in part[:k - 1].tolist()):
        at_kth = on_time[rows]
        cheaper = rows[at_kth < kth]
        tied = rows[at_kth == kth]
        need = k - cheaper.size  # >= 1: fewer than k rows cost less than the k-th
        if tied.size > need:
            tied = _soonest(tied, eta[tied], need)
        rows = np.concatenate((cheaper, tied))
    else:
        rows = _soonest(rows, eta[rows], k)
    rows.sort()  # index order: the sort's ties fall as among every row
    return rows


def _soonest(rows: npt.NDArray[np.intp], eta: FloatArray, need: int) -> npt.NDArray[np.intp]:
    """Of ``rows`` (ascending, their ETAs ``eta``), the ``need`` first by ETA then index
    (all of them when a NaN ETA leaves that unclear): those below the need-th ETA, then
    the lowest indices at it. Identical idle endpoints share the lowest ETA, so that
    case is looked at first."""
    lowest = eta.min()  # NaN if any
    if lowest != lowest:
        return rows
    at = eta == lowest
    if np.count_nonzero(at) >= need:
        first: npt.NDArray[np.intp] = rows[at][:need]
        return first
    part = eta.copy()
    part.partition(need - 1)
    kth = part[need - 1]
    sooner = rows[eta < kth]
    return np.concatenate((sooner, rows[eta == kth][:need - sooner.size]))


def _best_outside(cost: FloatArray, eta: FloatArray,
                  worse: npt.NDArray[np.bool_] | None) -> int | None:
    """:func:`rank_endpoints`' first choice without a sort: the lowest cost among the
    endpoints not marked ``worse``, then the lowest ETA, then the lowest index. None
    when that is not plain to see (no unmarked endpoint with a finite cost, a NaN cost
    or ETA among the candidates): the caller ranks them all then."""
    c = cost if worse is None else np.where(worse, np.inf, cost)
    lo = c[c.argmin()]  # argmin: the first lowest, or the first NaN
    if not math.isfinite(lo):
        return None
    tied_eta = np.where(c == lo, eta, np.inf)
    best = int(tied_eta.argmin())  # the first lowest ETA among the lowest costs
    return best if tied_eta[best] < math.inf else None


@dataclass(frozen=True)
class EndpointModel:
    """One endpoint's serving profile, as the scoring rule reads it.

    ``eps`` and ``tps`` are batch-indexed tables (index ``b`` = batch ``b``,
    1..max_batch; index 0 repeats batch 1), built once per profile. The rule
    reads them at ``batch``, the operating batch (:attr:`op_eps`, :attr:`op_tps`);
    :meth:`at` reads them at the batch the endpoint actually runs, the reference
    against which measured joules reveal profile drift.
    """

    eps: FloatArray
    tps: FloatArray
    batch: int = 1
    prefill_s_per_token: float = 0.0
    #: X(b), J above idle per decode step at batch b (index 0: 0); None: eps[b] * b
    #: (every joule counts, as for an endpoint described by fixed numbers)
    excess: FloatArray | None = None
    #: pi, J above idle per prompt token prefilled
    prefill_excess: float = 0.0
    #: b*_n of the marginal rule: requests it carries at once within the SLO
    #: (:func:`sustainable_batch`); 0: the operating batch
    carry: int = 0
    #: decode step time by batch, s (index 0 repeats batch 1); None: no step model
    itl: FloatArray | None = None
    #: the engine's token budget per step (vLLM's max_num_batched_tokens)
    budget_tokens: float = math.inf
    #: requests it carries at once within TPOT whatever the first token
    #: (:func:`sustainable_batch` without a TTFT bound); 0: the operating batch
    tpot_carry: int = 0
    #: the serving profile, TPOT SLO (s) and clock its rooms are sized at, and the pool's
    #: stream: slot load (:func:`slot_load`) and mean response; None without ``serving``
    #: (then its rooms do not follow a mix: :meth:`rooms_at_slot_load`)
    mix: tuple[ServingProfile, float, float | None, float, float] | None = None
    #: :func:`tpot_gate` of ``tpot_carry`` (:func:`overflow_rank`'s TPOT batch; 0: no
    #: batch keeps TPOT); -1: none
    gate_batch: int = -1
    #: rooms at each slot-load bin, filled as read
    _rooms: dict[int, tuple[float, float]] = field(default_factory=dict, compare=False,
                                                   repr=False)

    @classmethod
    def from_profile(
        cls, profile: ServingProfile, tpot_slo_s: float, clock_mhz: float | None = None,
        serving: tuple[float, float, float] | None = None,
        step_target_s: float | None = None,
        pool_size: int = 1,
    ) -> EndpointModel:
        """Tables of ``profile``; the operating batch is the largest meeting ``tpot_slo_s``.
        ``serving`` = (mean prompt, mean response tokens, TTFT SLO s) sets b*_n to
        :func:`sustainable_batch` (else b*_n is the operating batch), as one of
        ``pool_size`` endpoints of this profile in its pool. ``step_target_s``:
        the endpoint's clock follows its load, holding the decode step at this target
        (MIAD: (1 - margin) x TPOT), so X(b) is read at the clock batch b needs
        (:func:`excess_at_needed_clock` over the product's supported clocks) instead of
        at ``clock_mhz``."""
        max_b = max(int(profile.max_batch.value), 1)
        b = np.arange(0, max_b + 1, dtype=np.float64)
        b[0] = 1.0
        eps = np.asarray(profile.joules_per_token(b, clock_mhz), dtype=np.float64)
        tps = np.asarray(profile.decode_tokens_per_s(b, clock_mhz), dtype=np.float64)
        op = replica_point(profile, tpot_slo_s, clock_mhz).batch
        if step_target_s is None:
            excess = excess_step_j(profile.power_w(b, clock_mhz), profile.idle_w,
                                   profile.itl_s(b, clock_mhz))
        else:
            clocks = profile.product.supported_clocks()[:, None]
            itl_at = profile.itl_s(b[None, :], clocks)  # [clock, batch]
            excess = excess_at_needed_clock(
                itl_at, excess_step_j(profile.power_w(b[None, :], clocks), profile.idle_w,
                                      itl_at), step_target_s)
        excess[0] = 0.0
        pf = float(profile.prefill_s(1.0, clock_mhz))
        pi = float(prefill_excess_j_per_token(float(profile.prefill_power_w(clock_mhz)),
                                        profile.idle_w, pf))
        carry = tpot_carry = 0
        mix = None
        if serving is not None:
            carry = sustainable_batch(profile, serving[0], serving[1], serving[2],
                                      tpot_slo_s, clock_mhz, pool_size=pool_size)
            tpot_carry = sustainable_batch(profile, serving[0], serving[1], math.inf,
                                           tpot_slo_s, clock_mhz)
            mix = (profile, tpot_slo_s, clock_mhz, slot_load(serving[0], serving[1]),
                   serving[1])
            gate = tpot_gate(profile, tpot_carry, tpot_slo_s, clock_mhz)
        itl = np.asarray(profile.itl_s(b, clock_mhz), dtype=np.float64)
        return cls(eps, tps, op, pf, np.asarray(excess, dtype=np.float64), pi, carry, itl,
                   float(default_batched_tokens(profile.product)), tpot_carry, mix,
                   gate if serving is not None else -1)

    @classmethod
    def constant(cls, eps: float, tps: float) -> EndpointModel:
        """An endpoint described by fixed numbers (static endpoints file); no prefill model."""
        return cls(np.array([eps, eps], dtype=np.float64), np.array([tps, tps], dtype=np.float64))

    @property
    def max_batch(self) -> int:
        return int(self.eps.size - 1)

    @property
    def op_batch(self) -> int:
        """The operating batch, within the tables."""
        return min(max(int(self.batch), 1), self.max_batch)

    @property
    def op_eps(self) -> float:
        """eps_n: J/token at the operating batch."""
        return float(self.eps[self.op_batch])

    @property
    def op_tps(self) -> float:
        """mu_n: tokens/s at the operating batch."""
        return float(self.tps[self.op_batch])

    @property
    def weight(self) -> float:
        """w_n: decode tokens forgone per prompt token prefilled (:func:`prefill_weight`)."""
        return prefill_weight(self.op_tps, self.prefill_s_per_token)

    @functools.cached_property
    def excess_table(self) -> FloatArray:
        """X(b) for b = 0..max_batch (see :func:`excess_step_j`); computed once (the router
        reads it at every decision's refresh of the endpoint it routed to)."""
        if self.excess is not None:
            return self.excess
        x = self.eps * np.arange(self.eps.size, dtype=np.float64)
        return np.asarray(x, dtype=np.float64)

    @property
    def batch_limit(self) -> float:
        """Requests it carries at once within the SLO (:attr:`carry_batch`; none where
        :attr:`gate_batch` is 0: :func:`gated_room`), or infinite for an endpoint
        described by fixed numbers (no batch model)."""
        if self.excess is None:
            return math.inf
        gate = self.gate_batch
        return float(self.carry_batch if gate < 0 else gated_room(self.carry_batch, gate))

    @property
    def tpot_batch_limit(self) -> float:
        """Requests it carries at once within TPOT whatever the first token
        (:func:`overflow_rank`'s TPOT batch): :attr:`gate_batch` within the tables, else
        :attr:`tpot_carry_batch`; infinite for an endpoint described by fixed numbers."""
        if self.excess is None:
            return math.inf
        if self.gate_batch >= 0:
            return float(min(self.gate_batch, self.max_batch))
        return self.tpot_carry_batch

    @property
    def tpot_carry_batch(self) -> float:
        """Its mean batch at its TPOT-bound sustainable rate (:attr:`tpot_carry` within
        the tables, else the operating batch): what :func:`member_rooms` compares."""
        return float(min(self.tpot_carry, self.max_batch) if self.tpot_carry > 0
                     else self.op_batch)

    @functools.cached_property
    def carry_batch(self) -> int:
        """b*_n: :attr:`carry` within the tables, else the operating batch."""
        return min(self.carry, self.max_batch) if self.carry > 0 else self.op_batch

    @property
    def pool_slot_load(self) -> float:
        """The slot load of the stream its rooms are sized at (NaN without one)."""
        return self.mix[3] if self.mix is not None else math.nan

    def rooms_at_slot_load(self, load: float) -> tuple[float, float]:
        """(:attr:`batch_limit`, :attr:`tpot_batch_limit`) of a member credited with slot
        load ``load`` (:meth:`SlotLoadMoments.credible`): :func:`member_rooms` of its
        TPOT batch at that load (:func:`room_at_slot_load` on the grid relative to its
        pool's stream, within the tables); its pool's rooms in the pool's bin, when it
        has no stream (no ``serving``) or ``load`` is not > 0."""
        if self.mix is None or not load > 0.0:
            return self.batch_limit, self.tpot_batch_limit
        profile, tpot, clock, prior, mean_out = self.mix
        k = slot_load_bin(load, prior)
        if k == 0:
            return self.batch_limit, self.tpot_batch_limit
        hit = self._rooms.get(k)
        if hit is None:
            at_load = min(room_at_slot_load(profile, k, prior, mean_out, tpot, clock),
                          self.max_batch)
            room, mean = member_rooms(self.batch_limit, self.tpot_carry_batch, float(at_load))
            gate = float(min(tpot_gate(profile, mean, tpot, clock), self.max_batch))
            hit = self._rooms[k] = (gated_room(room, gate), gate)
        return hit

    def marginal_eps(self, in_flight: float) -> float:
        """eps_n joining ``in_flight`` others (:func:`marginal_decode_j_per_token`)."""
        return marginal_decode_j_per_token(self.excess_table, in_flight, self.carry_batch)

    def prefill_queue(self, running: float, waiting: float, waiting_tokens: float,
                      prefill_left_s: float = 0.0, mean_output_tokens: float = 0.0
                      ) -> tuple[float, float, float]:
        """:func:`prefill_queue` on this endpoint's engine; (0, 0, inf) without a step
        model (an endpoint described by fixed numbers: the first token is its prefill)."""
        if self.itl is None:
            return 0.0, 0.0, math.inf
        return prefill_queue(self.itl, self.prefill_s_per_token, self.budget_tokens, running,
                             waiting, waiting_tokens, prefill_left_s, mean_output_tokens)

    def batch_for(self, in_flight: npt.ArrayLike) -> npt.NDArray[np.int64]:
        """The batch a new request joins, given requests already in flight."""
        n = np.asarray(in_flight, dtype=np.float64)
        return np.asarray(np.clip(np.floor(n) + 1, 1, self.max_batch), dtype=np.int64)

    def at(self, in_flight: float) -> tuple[float, float]:
        """(eps J/token, tokens/s) at the batch a request joining ``in_flight`` others runs
        at: the drift estimator's reference, not the rule's eps (see the module doc)."""
        b = int(self.batch_for(in_flight))
        return float(self.eps[b]), float(self.tps[b])


def carbon_weights(g_per_kwh: npt.ArrayLike) -> FloatArray:
    """Per-endpoint factors that turn marginal joules into marginal carbon, on clusters
    whose objective is carbon: each endpoint's site intensity over the mean intensity of
    the endpoints given (gCO2/kWh, one per endpoint of a pool).

    The rule's energy terms (eps_n, pi_n, X_n(1)) times these are the request's marginal
    carbon in joules at the pool's mean intensity, so lambda (J per s late) keeps its
    scale. A NaN intensity (site unknown) weighs 1; with no known intensity, or a mean
    that is not positive, every weight is 1 (energy, not carbon, is ranked then)."""
    g = float_array(g_per_kwh)
    out = np.ones(g.shape, dtype=np.float64)
    known = ~np.isnan(g)
    if not known.any():
        return out
    mean = float(g[known].mean())
    if not mean > 0.0 or not math.isfinite(mean):
        return out
    out[known] = g[known] / mean
    return out


def sustainable_batch(profile: ServingProfile, mean_input_tokens: float,
                      mean_output_tokens: float, ttft_slo_s: float, tpot_slo_s: float,
                      clock_mhz: float | None = None,
                      headroom: Headroom | None = None, pool_size: int = 1) -> int:
    """Requests one instance carries at once while it keeps the SLO: the mean decode
    batch at :meth:`ServingProfile.serving_point`'s sustainable rate (chunked prefill
    in mixed steps, the KV cache and the queueing headroom included: the point the
    planner sizes pools at), at
    least 1. The marginal rule's b*_n in the simulator and the router: past it a request
    waits or breaks TPOT, however cheap joining looks. ``pool_size``: the instances of
    this profile in its pool, whose prefills the soonest-start rule makes one M/G/n
    queue (``serving_point``'s ``pool_size``; docs/planner.md, "Pool-level TTFT").
    """
    sp = profile.serving_point(mean_input_tokens, mean_output_tokens, ttft_slo_s,
                               tpot_slo_s, clock_mhz, headroom, pool_size=pool_size)
    return max(int(sp.batch), 1)


def tpot_gate(profile: ServingProfile, mean_batch: float, tpot_slo_s: float,
              clock_mhz: float | None = None, headroom: Headroom | None = None) -> int:
    """Requests an instance may hold at once before :func:`overflow_rank` counts it full
    for TPOT, given ``mean_batch``, its mean decode batch at its TPOT-bound sustainable
    rate (:func:`sustainable_batch` without a TTFT bound, or :func:`room_at_slot_load`).

    That batch is a mean (Little's law): at that rate the requests an engine holds vary
    about it as the number in an M/G/inf system does (Poisson of that mean), and the
    serving model's TPOT tail already counts those moments. So the gate is the batch
    the engine exceeds at most ``headroom.tpot_miss`` of the time at that rate (the
    Poisson quantile), never past the largest batch whose decode step alone meets the
    TPOT (:meth:`ServingProfile.best_batch`) and never below the mean itself. Measured
    with the mean as the gate (docs/experiments/simulator.md, "Why the held-out cells fail"): with
    ~30-token answers the mean is 1-6, so a busy instance counted as full at once and
    prompts went to endpoints whose first token was later, or to a slower mode.

    An instance whose decode step alone breaks the TPOT at batch 1
    (:meth:`ServingProfile.best_batch` 0: an L4 at a 50 ms TPOT) holds none within it:
    0, whatever its mean batch (:func:`sustainable_batch` is at least 1, for the
    marginal energy's tables). Measured with 1 there (docs/experiments/marginal-energy.md, "Rooms
    of an instance that cannot keep TPOT"): the router counted the idle instance's one
    slot as room and sent it requests that all missed TPOT.
    """
    top = profile.best_batch(tpot_slo_s, clock_mhz)
    if top < 1:
        return 0
    hr = headroom or DEFAULT_HEADROOM
    mean = max(float(mean_batch), 1.0)
    quantile = int(poisson.ppf(1.0 - hr.tpot_miss.value, mean))
    return max(int(mean), min(quantile, top))


def gated_room(room: Batch, gate: Batch) -> Batch:
    """The batch room (b*_n, the limit of :func:`slo_infeasible`'s ``batch_room``) of an
    instance whose TPOT gate (:func:`tpot_gate`) is ``gate``: none where the gate is 0
    (no batch keeps TPOT there, so every request it takes misses it), else ``room``."""
    return room if gate >= 1 else gate


#: grid of a member's credible slot load that its batch room is read at, in bins per
#: octave relative to its pool's slot load (bin 0 is the pool's): a 9 % step, so that
#: rooms can be tabulated (:meth:`ServingProfile.serving_point` is a bisection)
SLOT_LOAD_BINS_PER_OCTAVE = 8


def slot_load(input_tokens: float, output_tokens: float) -> float:
    """Prompt tokens per decode step that one batch slot brings, in steady state, while it
    holds requests like this one: the slot turns over every ``output_tokens`` steps (at
    least 1) and each turn prefills an ``input_tokens`` prompt into the mixed steps.

    The requests an endpoint holds are a sample of the stream it receives biased to long
    responses (each stays in proportion to its response: Little's law), and the plain
    mean of their slot loads undoes that bias exactly: it estimates
    sum(lam_i P_i) / sum(lam_i o_i), the stream's mean prompt over its mean response, the
    ratio :func:`sustainable_batch`'s TPOT bound falls with (docs/experiments/marginal-energy.md,
    "Per-member room")."""
    return input_tokens / (output_tokens if output_tokens > 1.0 else 1.0)


def slot_load_terms(n: float, total: float, squares: float) -> tuple[float, float, float,
                                                                    float, float, float]:
    """One pool member's terms of :class:`SlotLoadMoments`' six sums, when it holds ``n``
    requests whose slot loads (:func:`slot_load`) sum to ``total`` and their squares to ``squares``
    (all 0 while it holds none)."""
    if n <= 0:
        return 0.0, 0.0, 0.0, 0.0, 0.0, 0.0
    return n, 1.0, total, squares, total * total / n, n * n


def slot_load_spread(requests: float, members: float, total: float, squares: float,
                     member_squares: float, count_squares: float) -> tuple[float, float]:
    """(EPV, VHM) of a pool's slot loads, from its sums (:class:`SlotLoadMoments`), the
    Buhlmann-Straub estimates: EPV the within-member variance of slot loads (pooled over
    the members), VHM the variance of the members' true means (their spread less what
    sampling explains; <= 0 when the members' means differ no more than samples of one
    stream would). (0, 0) with fewer than two members holding any or no within-member
    degree of freedom."""
    if members < 2 or requests <= members:
        return 0.0, 0.0
    epv = (squares - member_squares) / (requests - members)
    if epv < 0.0:  # rounding of a pool whose members hold equal loads
        epv = 0.0
    between = member_squares - total * total / requests
    vhm = (between - (members - 1.0) * epv) / (requests - count_squares / requests)
    return epv, vhm


def slot_load_credibility(n: float, requests: float, members: float, total: float,
                          squares: float, member_squares: float, count_squares: float
                          ) -> float:
    """Buhlmann-Straub credibility Z in [0, 1] of the mean slot load of a member holding
    ``n`` requests, from its pool's sums (:class:`SlotLoadMoments`): n / (n + EPV / VHM)
    (:func:`slot_load_spread`); 0 where VHM <= 0 (the router does not sort requests by
    mix) or ``n`` <= 0. Plain floats: the simulator calls it per routing-row refresh."""
    if n <= 0:
        return 0.0
    return credibility_at(n, *slot_load_spread(requests, members, total, squares,
                                               member_squares, count_squares))


def credibility_at(n: float, epv: float, vhm: float) -> float:
    """Buhlmann-Straub credibility n / (n + EPV / VHM) of a member holding ``n``
    requests, given its pool's (EPV, VHM) (:func:`slot_load_spread`); 0 where VHM <= 0
    or ``n`` <= 0."""
    if n <= 0 or not vhm > 0.0:
        return 0.0
    return n * vhm / (n * vhm + epv)


def credited_slot_load(n: float, total: float, prior: float, epv: float, vhm: float
                       ) -> float:
    """The slot load an engine holding ``n`` requests whose slot loads sum to ``total`` is
    credited with, given the (EPV, VHM) of the pool that credits it
    (:func:`slot_load_spread`): Z x its mean + (1 - Z) x ``prior`` (its stream's), Z =
    :func:`credibility_at`; ``prior`` where Z is 0. The engine's requests are all those
    it holds, whichever pool routed them, and an engine several pools share is credited
    by its home pool's spread, once: the simulator's rule and the routing service's
    (docs/experiments/marginal-energy.md, "Per-member room")."""
    z = credibility_at(n, epv, vhm)
    return prior if z <= 0.0 else z * (total / n) + (1.0 - z) * prior


@dataclass(frozen=True)
class SlotLoadMoments:
    """The slot loads (:func:`slot_load`) of the requests a pool's members hold (routed to them and
    unfinished), summed over the members (each member's terms: :func:`slot_load_terms`):
    the inputs of a member's credible slot load, :meth:`credible`.

    ``requests`` N = sum n_j; ``members`` m, those holding any; ``total`` sum s_j (s_j a
    member's sum of slot loads); ``squares`` the sum of their squares; ``member_squares``
    sum s_j^2 / n_j; ``count_squares`` sum n_j^2."""

    requests: float = 0.0
    members: float = 0.0
    total: float = 0.0
    squares: float = 0.0
    member_squares: float = 0.0
    count_squares: float = 0.0

    @classmethod
    def of(cls, held: Sequence[tuple[float, float, float]]) -> SlotLoadMoments:
        """The sums over members each holding (n, sum of slot loads, sum of squares)."""
        sums = [0.0] * 6
        for n, total, squares in held:
            for k, term in enumerate(slot_load_terms(n, total, squares)):
                sums[k] += term
        return cls(*sums)

    def credible(self, n: float, total: float, prior: float) -> float:
        """The slot load a member holding ``n`` requests whose slot loads sum to ``total``
        is credited with: Z x its mean + (1 - Z) x ``prior``, the pool's stream's (mean
        prompt / mean response), Z from :func:`slot_load_credibility`. A member's own
        mean from a few requests says little (one long prompt with a short answer would
        make it look full); the members' spread says how far a member's stream differs
        from the pool's once the router sorts requests by mix."""
        return credited_slot_load(n, total, prior, *slot_load_spread(
            self.requests, self.members, self.total, self.squares, self.member_squares,
            self.count_squares))


def slot_load_bin(load: float, prior: float) -> int:
    """The grid bin (:data:`SLOT_LOAD_BINS_PER_OCTAVE`) of slot load ``load`` relative to
    the pool's ``prior``: 0 at the prior, +8 at twice it (both > 0)."""
    return round(math.log2(load / prior) * SLOT_LOAD_BINS_PER_OCTAVE)


def room_at_slot_load(profile: ServingProfile, load_bin: int, prior: float,
                      mean_output_tokens: float, tpot_slo_s: float,
                      clock_mhz: float | None = None) -> int:
    """The TPOT batch (:func:`sustainable_batch` without a TTFT bound) of a member
    credited with the slot load of bin ``load_bin`` (:func:`slot_load_bin` relative to
    ``prior``): responses of ``mean_output_tokens`` (its pool's) with prompts of that
    load x the response."""
    load = prior * 2.0 ** (load_bin / SLOT_LOAD_BINS_PER_OCTAVE)
    return sustainable_batch(profile, load * mean_output_tokens, mean_output_tokens,
                             math.inf, tpot_slo_s, clock_mhz)


def member_rooms(pool_batch: Batch, pool_tpot_batch: Batch, tpot_batch_at_load: Batch
                 ) -> tuple[Batch, Batch]:
    """(b*_n, TPOT batch) of a pool member: the TPOT batch at the slot load it is
    credited with (``tpot_batch_at_load``: :func:`room_at_slot_load` of
    :meth:`SlotLoadMoments.credible`), and b*_n the lesser of that and its pool's TTFT
    bound: its pool's b*_n (``pool_batch``, :func:`sustainable_batch` at the pool's
    stream) where that is below the pool's TPOT batch (``pool_tpot_batch``: the first
    token binds), none where they are equal (TPOT binds, and follows the member's load
    both ways).

    Only TPOT follows a member's own load: nothing else checks TPOT against the prompts
    a member actually receives, and prompt chunks mixed into its decode steps make the
    batch within TPOT fall steeply as prompts grow against responses. The first token is
    checked per request against the member's actual prefill queue (:func:`slo_infeasible`'s
    guard), and the TTFT bound stays the sizing point its pool was planned at
    (docs/experiments/marginal-energy.md, "Per-member room")."""
    if pool_batch < pool_tpot_batch and pool_batch < tpot_batch_at_load:
        return pool_batch, tpot_batch_at_load
    return tpot_batch_at_load, tpot_batch_at_load


@dataclass(frozen=True)
class ReplicaPoint:
    """Where a serving replica runs: its batch, J/token and tokens/s."""

    batch: int
    eps: float
    tps: float
    #: J above idle per token a replica adds at this batch: its share of a full step,
    #: the marginal rule's X(b*) / b* (what the extender's placement cost charges)
    marginal_eps: float = math.nan


def replica_point(
    profile: ServingProfile, tpot_slo_s: float, clock_mhz: float | None = None
) -> ReplicaPoint:
    """The replica's operating point: the largest batch meeting TPOT (at least 1)."""
    b = max(profile.best_batch(tpot_slo_s, clock_mhz), 1)
    full = float(excess_step_j(float(profile.power_w(b, clock_mhz)), profile.idle_w,
                               float(profile.itl_s(b, clock_mhz))))
    return ReplicaPoint(
        b,
        float(profile.joules_per_token(b, clock_mhz)),
        float(profile.decode_tokens_per_s(b, clock_mhz)),
        marginal_decode_j_per_token([0.0] * b + [full], b, b),
    )


def replica_demand_tps(
    instance_tps: npt.ArrayLike, instances: npt.ArrayLike, utilisation: float
) -> float:
    """Tokens/s one replica of a pool carries: the plan's instance-weighted mean
    instance throughput at the planned utilisation (the planner sizes pools
    with headroom alpha, so utilisation is about 1/alpha)."""
    tps = np.asarray(instance_tps, dtype=np.float64)
    n = np.maximum(np.asarray(instances, dtype=np.float64), 0.0)
    ok = np.isfinite(tps) & (tps > 0) & (n > 0)
    if not ok.any():
        return 0.0
    return float(utilisation * np.sum(tps[ok] * n[ok]) / np.sum(n[ok]))


def node_capacity_tps(
    allocatable_gpus: npt.ArrayLike, gpus_per_instance: int, instance_tps: npt.ArrayLike
) -> FloatArray:
    """Tokens/s a node's GPUs sustain as whole instances of ``gpus_per_instance`` GPUs."""
    g = np.maximum(np.asarray(allocatable_gpus, dtype=np.float64), 0.0)
    per = max(int(gpus_per_instance), 1)
    return np.asarray(np.floor(g / per) * np.asarray(instance_tps, dtype=np.float64))


def node_load_tps(
    used_gpus: npt.ArrayLike,
    gpus_per_instance: int,
    instance_tps: npt.ArrayLike,
    utilisation: float,
    queue_tokens: npt.ArrayLike,
    horizon_s: float,
) -> FloatArray:
    """Load already on a node, in tokens/s of the candidate's instance type.

    GPUs held by bound pods count as instances running at ``utilisation``;
    tokens queued on the node's endpoints must drain within ``horizon_s``.
    """
    per = max(int(gpus_per_instance), 1)
    busy = (
        np.maximum(np.asarray(used_gpus, dtype=np.float64), 0.0) / per
        * np.asarray(instance_tps, dtype=np.float64) * float(utilisation)
    )
    queue = np.maximum(np.asarray(queue_tokens, dtype=np.float64), 0.0) / max(
        float(horizon_s), 1e-9
    )
    return np.asarray(busy + queue, dtype=np.float64)
