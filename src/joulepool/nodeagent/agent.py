"""The node agent: per-GPU MIAD clock control, energy metering and J/token estimates.

Every period (default 1 s), for each GPU:

1. read the energy counter, power and SM clock; feed the J/token estimator
   with the energy delta and the new output tokens of the engine(s) on it;
2. build the SLO signal from those engines (``core.controllers.miad_signal`` of each
   engine's period observables, :mod:`joulepool.nodeagent.signals`: the period's mean
   inter-token latency, the TTFT tail, waiting requests; the worst engine's) and the
   SLO from the plan: the tightest of the pools those engines' pods serve
   (``core.controllers.held_slo``; a shared instance's guests too), no other pool's;
3. ask ``core.controllers.MIADController`` for the next clock and lock it
   (``min = lowest supported``, ``max = f``: the GPU may still idle lower);
   in power mode (``control="power"``) MIAD steers the GPU's power limit
   instead (levels 5 W apart within the device's constraints, additive
   decrease ``power_step_w``), and "reset" below means restoring the default
   limit.

GPU safety, which is the point of this module:

* every backend (NVML) call runs on one worker thread, bounded in time
  (:mod:`joulepool.nodeagent.gpuio`): a hung driver never stops the event
  loop, so ``/healthz`` keeps answering and SIGTERM is handled at once; a
  call past its bound is a failed call (``TIMEOUT``);
* clocks are reset on start (a crashed predecessor may have left them
  locked), on stop (SIGTERM / SIGINT), after any control error, and whenever
  a GPU has no engine signal or no SLO (no signal, no control); a GPU counts
  as unlocked only once a reset succeeded: a failed reset (at start too) is
  retried every period with backoff; on stop every GPU's reset is tried,
  whatever the agent believes about it, retried with backoff until it
  succeeds or ``reset_grace_s`` (inside the pod's termination grace period)
  runs out, and a failure on one GPU never skips the others;
* without privilege (NO_PERMISSION) the agent goes monitor-only: it says so
  once in the log and in ``joulepool_sidecar_monitor_only``, keeps measuring,
  and never exits for it; clocks it had already locked on other GPUs (the
  permission can differ per GPU) are reset on the way in;
* nothing from the API server can stall control: plan / policy refreshes run
  in the background (a period waits for them only briefly and otherwise uses
  the last good copy), each period is bounded in time (an overrun counts as a
  control error and resets the clocks), and SIGTERM / SIGINT interrupt a
  period in progress so the reset on stop is prompt;
* a lost GPU is reported (``joulepool_gpu_lost``, one log line), probed again
  every ``lost_retry_s``, and never stops the other GPUs' control;
* a GPU that cannot lock clocks (NOT_SUPPORTED) is measured only; one whose
  energy counter is not supported is metered by integrating power.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from functools import partial

from joulepool.core.attribution import Work
from joulepool.core.batching import unqueued_first_token_s
from joulepool.core.controllers import (
    MIAD_PERIOD_S,
    Direction,
    MIADController,
    SLOSignal,
    prefill_clock_floor,
)
from joulepool.core.device import DeviceInfo, GPUBackend, GPUError, GPUErrorKind
from joulepool.core.estimators import (
    EPS_HALF_LIFE_S,
    EnergyPerTokenEstimator,
    counter_delta,
    trapezoid_energy_j,
)
from joulepool.core.feedback import OperatingPointEstimator
from joulepool.core.powercap import power_cap_for_clock
from joulepool.core.profiles import (
    GPUProduct,
    ServingProfile,
    default_batched_tokens,
    find_profile,
    product_for_label,
)
from joulepool.nodeagent.background import Background
from joulepool.nodeagent.gpuio import DEFAULT_CALL_TIMEOUT_S, GPUCalls
from joulepool.nodeagent.metrics import AgentMetrics, GPUSample
from joulepool.nodeagent.plansource import NoPlan, PlanSource, PolicySource, pools_on_node
from joulepool.nodeagent.podresources import GPUWorkloads
from joulepool.nodeagent.poolmeter import PoolMeter
from joulepool.nodeagent.publisher import (
    Measurement,
    PoolPromptPublisher,
    ProfilePublisher,
    PromptCounts,
)
from joulepool.nodeagent.signals import EngineReading, SignalSource

log = logging.getLogger("joulepool.nodeagent")

#: what the agent can steer on a GPU: locked SM clocks, or the power limit
CONTROL_MODES = ("clocks", "power")
#: power mode: the power limits MIAD chooses among are this many watts apart
POWER_LEVEL_W = 5.0


class FloorState(StrEnum):
    """Whether MIAD's prefill clock floor is in force on a GPU, and why not."""

    APPLIED = "applied"
    NO_HISTOGRAM = "no_histogram"
    NO_TRAFFIC = "no_traffic"
    NO_PROFILE = "no_profile"

    @property
    def reason(self) -> str:
        """The state in words, for the agent's log line."""
        return {
            "applied": "applied",
            "no_histogram": "the engine publishes no prompt-length histogram "
                            "(vllm:request_prompt_tokens; SGLang needs --collect-tokens-histogram)",
            "no_traffic": "no request has finished yet, so no prompt length is known",
            "no_profile": "no serving profile for this GPU product, model and GPU count",
        }[self.value]


def _first_token_s(profile: ServingProfile, prompt_tokens: float, running: int,
                   clock_mhz: float) -> float:
    """Seconds to the first token of a prompt of ``prompt_tokens`` on an instance of
    ``profile`` at ``clock_mhz`` beside the ``running`` requests the engine reports
    (``core.batching.unqueued_first_token_s``, under vLLM V1's default token budget for
    the GPU; prefill_clock_floor's callable, with the prompt and batch bound; the
    simulator's)."""
    decode = float(profile.itl_s(running, clock_mhz)) if running > 0 else 0.0
    return unqueued_first_token_s(default_batched_tokens(profile.product), running,
                                  prompt_tokens, decode, float(profile.prefill_s(1.0, clock_mhz)))


def power_levels(lo_w: float, hi_w: float) -> list[float]:
    """The power limits (W) MIAD steers among: ``lo_w`` to ``hi_w`` in POWER_LEVEL_W steps."""
    n = max(int((hi_w - lo_w) // POWER_LEVEL_W), 0)
    return sorted({*(lo_w + i * POWER_LEVEL_W for i in range(n + 1)), hi_w})


@dataclass
class AgentConfig:
    node: str = "node"
    interval_s: float = MIAD_PERIOD_S
    k_inc: float = MIADController.k_inc
    step_mhz: float = MIADController.step_mhz
    margin: float = MIADController.margin
    #: SLO used when the plan names none for an engine's pool (None: no control)
    ttft_slo_s: float | None = None
    tpot_slo_s: float | None = None
    lost_retry_s: float = 30.0
    eps_half_life_s: float = EPS_HALF_LIFE_S
    #: a control period longer than this is abandoned (None: 3 periods, at least 2 s)
    tick_timeout_s: float | None = None
    #: what MIAD steers: "clocks" (locked SM clocks) or "power" (the GPU's power limit)
    control: str = "clocks"
    #: power mode: MIAD's additive decrease step, watts
    power_step_w: float = 10.0
    #: longest wait for one GPU backend (NVML) call; longer is a failed call
    call_timeout_s: float = DEFAULT_CALL_TIMEOUT_S
    #: on stop, failed resets are retried with backoff for at most this long (seconds);
    #: keep it below the pod's terminationGracePeriodSeconds
    reset_grace_s: float = 20.0

    @property
    def tick_timeout(self) -> float:
        if self.tick_timeout_s is not None:
            return self.tick_timeout_s
        # room for one GPU call to run into its bound without abandoning the period
        return max(3.0 * self.interval_s, 2.0, self.call_timeout_s + 1.0)

    @property
    def refresh_wait_s(self) -> float:
        """How long a period waits for a plan / policy refresh it started."""
        return min(0.2 * self.interval_s, 0.5)

    def __post_init__(self) -> None:
        if self.interval_s <= 0:
            raise ValueError("interval must be > 0")
        if self.tick_timeout_s is not None and self.tick_timeout_s <= 0:
            raise ValueError("tick timeout must be > 0")
        if self.control not in CONTROL_MODES:
            raise ValueError(f"control must be one of {CONTROL_MODES}, got {self.control!r}")
        if self.power_step_w <= 0:
            raise ValueError("power step must be > 0")
        if self.call_timeout_s <= 0:
            raise ValueError("GPU call timeout must be > 0")
        if self.reset_grace_s < 0:
            raise ValueError("reset grace must be >= 0")
        if (self.ttft_slo_s is None) != (self.tpot_slo_s is None):
            raise ValueError("give both TTFT and TPOT fallback SLOs, or neither")
        if self.ttft_slo_s is not None and (self.ttft_slo_s <= 0 or (self.tpot_slo_s or 0) <= 0):
            raise ValueError("SLO targets must be > 0")
        # MIAD's own validation (k_inc > 1, step > 0, 0 <= margin < 1) runs here too
        MIADController([1.0], 1.0, 1.0, self.k_inc, self.step_mhz, self.margin)


@dataclass
class GPU:
    """What the agent knows about one GPU."""

    info: DeviceInfo
    product: GPUProduct | None
    supported: list[float] = field(default_factory=list)
    controllable: bool = True
    lost: bool = False
    #: the cap we set, None when not (or no longer) ours: a clock (MHz) in clocks mode,
    #: a power limit (W) in power mode
    locked_mhz: float | None = None
    #: clocks may be locked: True from start (a predecessor may have locked them) and
    #: after each lock, False only once a reset succeeded
    needs_reset: bool = True
    next_reset: float = 0.0  # monotonic time of the next retry of a failed reset
    reset_backoff_s: float = 0.0
    energy_counter: bool = True
    last_energy_mj: float | None = None
    last_power_w: float | None = None
    last_t: float | None = None
    next_probe: float = 0.0
    eps: EnergyPerTokenEstimator = field(default_factory=EnergyPerTokenEstimator)
    #: tokens/s and clock of the same window as ``eps`` (published with it)
    op: OperatingPointEstimator = field(
        default_factory=lambda: OperatingPointEstimator(EPS_HALF_LIFE_S))
    model: str | None = None
    group: frozenset[int] = frozenset()  # GPUs of the instance(s) this GPU serves
    group_mapped: bool = False  # an engine named the group's GPUs (so it is one instance)
    controller: MIADController | None = None
    controller_slo: tuple[float, float] | None = None
    controller_params: tuple[float, float, float] | None = None
    floor_state: FloorState | None = None  # last prefill-floor state shown (logged on change)
    power_w: float = 0.0
    sm_clock_mhz: float = 0.0
    work: tuple[Work, ...] = ()  # pool, model and site of each engine using it this period
    energy_j: float = 0.0  # metered since the agent started

    @property
    def index(self) -> int:
        return self.info.index

    @property
    def product_name(self) -> str:
        return self.product.name if self.product else self.info.name


class NodeAgent:
    @property
    def backend(self) -> GPUBackend:
        return self.gpu_io.backend

    @backend.setter
    def backend(self, backend: GPUBackend) -> None:
        self.gpu_io.backend = backend

    def __init__(
        self,
        backend: GPUBackend,
        source: SignalSource,
        config: AgentConfig | None = None,
        plan: PlanSource | None = None,
        publisher: ProfilePublisher | None = None,
        metrics: AgentMetrics | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        policy: PolicySource | None = None,
        workloads: GPUWorkloads | None = None,
        prompt_publisher: PoolPromptPublisher | None = None,
    ) -> None:
        self.policy = policy
        #: writes each pool's prompt lengths seen here to its status (the planner's tail)
        self.prompt_publisher = prompt_publisher
        self._publishing_prompts: asyncio.Task[None] | None = None
        #: which container each GPU is allocated to (the DCGM labels of the measurements)
        self.workloads = workloads
        self.source = source
        self.config = config or AgentConfig()
        #: what MIAD steers now: the EnergyPolicy's miad.control while it sets one, else
        #: the configured mode (switched only once every GPU is handed back)
        self.control = self.config.control
        #: every backend call goes through here: off the event loop, bounded in time
        self.gpu_io = GPUCalls(backend, timeout_s=self.config.call_timeout_s)
        self.reset_count = 0  # GPUs the last stop() reset
        self.plan: PlanSource = plan or NoPlan()
        self.publisher = publisher
        self.metrics = metrics or AgentMetrics(self.config.node)
        self.pool_meter = PoolMeter(self.metrics.registry)
        self._site = ""
        self._g_per_kwh: float | None = None
        self._only_pool: str | None = None
        #: this period's pools per discovered serving pod (:meth:`_pod_pools`)
        self._served: dict[str, tuple[str, ...]] = {}
        self.metrics.gpu_samples = self.gpu_samples
        self.monotonic = monotonic
        self.gpus: list[GPU] = []
        self.monitor_only = False
        self.monitor_only_reason = ""
        self.last_tick: float | None = None
        self.lags: deque[float] = deque(maxlen=100_000)
        self.ticks = 0
        self._publishing: asyncio.Task[None] | None = None
        self._logged: set[str] = set()
        self._refresher = Background(self._refresh_sources, self.config.refresh_wait_s)
        self._stopping = False  # set by stop(): no clock is locked after it

    # ------------------------------------------------------------------ helpers
    def _labels(self, gpu: GPU) -> tuple[str, str, str]:
        return self.metrics.gpu(gpu.index, gpu.product_name)

    def _once(self, key: str, level: int, msg: str, *args: object) -> None:
        if key not in self._logged:
            self._logged.add(key)
            log.log(level, msg, *args)

    async def _enter_monitor_only(self, reason: str) -> None:
        if not self.monitor_only:
            self.monitor_only = True
            self.monitor_only_reason = reason
            self.metrics.monitor_only.labels(self.config.node).set(1)
            log.warning("monitor-only: cannot lock GPU clocks (%s); measuring energy only. "
                        "Run the agent with CAP_SYS_ADMIN (or as root) to control clocks.",
                        reason)
        for gpu in self.gpus:
            if gpu.locked_mhz is not None and not gpu.lost:
                # we locked it before the permission failed (elsewhere): hand it back now
                await self._try_reset(gpu, self.monotonic())
            gpu.locked_mhz = None
            self._show_target(gpu, 0)

    def _mark_lost(self, gpu: GPU, exc: GPUError, now: float) -> None:
        if not gpu.lost:
            log.error("GPU %d (%s, %s) is lost: %s; the other GPUs stay under control",
                      gpu.index, gpu.product_name, gpu.info.uuid, exc)
        gpu.lost = True
        gpu.locked_mhz = None
        gpu.next_probe = now + self.config.lost_retry_s
        self.metrics.gpu_lost.labels(*self._labels(gpu)).set(1)
        self._show_target(gpu, 0)

    def _not_controllable(self, gpu: GPU, exc: GPUError) -> None:
        gpu.controllable = False
        gpu.locked_mhz = None
        gpu.needs_reset = False  # a GPU that cannot lock clocks has none locked
        self._set_reset_pending(gpu)
        self.metrics.controllable.labels(*self._labels(gpu)).set(0)
        self._once(f"nosupport:{gpu.index}", logging.WARNING,
                   "GPU %d cannot lock clocks (%s): measuring only", gpu.index, exc)

    async def _on_error(self, gpu: GPU, exc: GPUError, now: float, what: str) -> None:
        """React to a failed backend call on one GPU (never raises)."""
        if exc.kind is GPUErrorKind.LOST:
            self._mark_lost(gpu, exc, now)
        elif exc.kind is GPUErrorKind.NO_PERMISSION:
            await self._enter_monitor_only(str(exc))
        elif exc.kind is GPUErrorKind.NOT_SUPPORTED and what in ("lock", "reset"):
            self._not_controllable(gpu, exc)
        else:
            self.metrics.control_errors.labels(*self._labels(gpu)).inc()
            key = f"err:{gpu.index}:{what}"
            level = logging.DEBUG if key in self._logged else logging.WARNING
            self._logged.add(key)  # a persistent fault: the metric counts, the log says it once
            log.log(level, "GPU %d: %s failed: %s; resetting its clocks", gpu.index, what, exc)
            if what != "reset":
                await self._reset(gpu, now)

    def _set_reset_pending(self, gpu: GPU) -> None:
        self.metrics.reset_pending.labels(*self._labels(gpu)).set(1 if gpu.needs_reset else 0)

    def _reset_failed(self, gpu: GPU, now: float) -> None:
        """Schedule the next try of a failed reset: 0.1 s doubling to 10 s (or the period)."""
        cap = max(10.0, self.config.interval_s)
        gpu.reset_backoff_s = min(max(2.0 * gpu.reset_backoff_s, 0.1), cap)
        gpu.next_reset = now + gpu.reset_backoff_s
        self._set_reset_pending(gpu)

    def _reset_done(self, gpu: GPU) -> None:
        gpu.locked_mhz = None
        gpu.needs_reset = False
        gpu.reset_backoff_s = 0.0
        self._set_reset_pending(gpu)
        self._show_target(gpu, 0)

    async def _reset(self, gpu: GPU, now: float) -> bool:
        """Unlock one GPU's clocks; True when it is known to be unlocked."""
        if not gpu.controllable or gpu.lost:
            return False
        try:
            await self.gpu_io.hand_back(gpu.index, self.control, wait_if_hung=False)
        except GPUError as exc:
            self._reset_failed(gpu, now)
            if self.monitor_only and exc.kind is GPUErrorKind.NO_PERMISSION:
                return False
            await self._on_error(gpu, exc, now, "reset")
            return False
        self._reset_done(gpu)
        return True

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Find the GPUs and reset their clocks. Raises GPUError if the backend cannot start.

        A reset that fails here leaves the GPU marked ``needs_reset``: every period
        retries it (with backoff) until it succeeds."""
        await self.gpu_io.init()
        self._stopping = False
        now = self.monotonic()
        self.gpus = []
        for info in await self.gpu_io.devices():
            gpu = GPU(info, product_for_label(info.name),
                      eps=EnergyPerTokenEstimator(half_life_s=self.config.eps_half_life_s),
                      op=OperatingPointEstimator(self.config.eps_half_life_s))
            self.gpus.append(gpu)
            self._init_metrics(gpu)
            try:
                gpu.supported = await self._levels(info.index)
                if not gpu.supported:
                    raise GPUError(GPUErrorKind.NOT_SUPPORTED, "no supported clocks", info.index)
            except GPUError as exc:
                if exc.kind is GPUErrorKind.LOST:
                    self._mark_lost(gpu, exc, now)
                elif exc.kind in (GPUErrorKind.NOT_SUPPORTED, GPUErrorKind.NO_PERMISSION):
                    self._not_controllable(gpu, exc)
                else:  # a transient fault: measure for now, keep trying to reset it
                    gpu.controllable = False
                    self._once(f"noclocks:{gpu.index}", logging.WARNING,
                               "GPU %d: cannot list its clocks (%s): measuring only",
                               info.index, exc)
                continue
            if not self.monitor_only:
                await self._reset(gpu, now)  # safety: a predecessor may have left clocks locked
                if self.control == "power":  # and one in clocks mode locked clocks
                    with contextlib.suppress(GPUError):
                        await self.gpu_io.reset_locked_clocks(gpu.index, wait_if_hung=False)
        log.info("node agent on %s: %d GPU(s): %s%s", self.config.node, len(self.gpus),
                 ", ".join(f"{g.index}={g.product_name}" for g in self.gpus),
                 " (monitor-only)" if self.monitor_only else "")

    async def _levels(self, index: int) -> list[float]:
        """What MIAD chooses among: lockable clocks (MHz), or power limits (W)."""
        if self.control == "power":
            lo, hi = await self.gpu_io.power_limit_constraints_w(index)
            return power_levels(lo, hi)
        return sorted(await self.gpu_io.supported_clocks_mhz(index))

    def _show_target(self, gpu: GPU, value: float) -> None:
        """The cap in force on the metrics (0: none, the driver decides)."""
        labels = self._labels(gpu)
        power = self.control == "power"
        self.metrics.target_clock.labels(*labels).set(0 if power else value * 1e6)
        self.metrics.target_power_limit.labels(*labels).set(value if power else 0)

    def _init_metrics(self, gpu: GPU) -> None:
        labels = self._labels(gpu)
        self.metrics.gpu_lost.labels(*labels).set(0)
        self.metrics.target_clock.labels(*labels).set(0)
        self.metrics.target_power_limit.labels(*labels).set(0)
        self.metrics.controllable.labels(*labels).set(1)
        self.metrics.reset_pending.labels(*labels).set(1)
        for d in Direction:
            self.metrics.decisions.labels(*labels, d.value)
        self.metrics.control_errors.labels(*labels)

    async def _try_reset(self, gpu: GPU, now: float, patient: bool = False) -> bool | None:
        """Reset one GPU's clocks whatever we believe about it; never raises.

        ``patient``: wait (up to the call bound) for a reset queued behind a hung call.

        True: unlocked. None: nothing to retry (no privilege, not supported, a
        lost GPU: said once per GPU and kind). False: a failure worth retrying.
        """
        try:
            await self.gpu_io.hand_back(gpu.index, self.control, wait_if_hung=patient)
        except GPUError as exc:
            final = (GPUErrorKind.NO_PERMISSION, GPUErrorKind.NOT_SUPPORTED,
                     GPUErrorKind.LOST)
            level = logging.INFO if exc.kind in final else logging.WARNING
            self._once(f"reset:{gpu.index}:{exc.kind.value}", level,
                       "GPU %d: reset of locked clocks failed: %s", gpu.index, exc)
            if exc.kind is GPUErrorKind.LOST and not gpu.lost:
                self._mark_lost(gpu, exc, now)
            if exc.kind is GPUErrorKind.NOT_SUPPORTED:
                gpu.needs_reset = False  # it cannot lock clocks, so none are locked
            self._reset_failed(gpu, now)
            return None if exc.kind in final else False
        except Exception as exc:  # a backend bug must not skip the other GPUs
            self._once(f"reset:{gpu.index}:{type(exc).__name__}", logging.WARNING,
                       "GPU %d: reset of locked clocks failed: %r", gpu.index, exc)
            self._reset_failed(gpu, now)
            return False
        self._reset_done(gpu)
        return True

    async def reset_all(self, grace_s: float = 0.0) -> int:
        """Try to unlock every GPU (each one, whatever the agent's state); returns how many.

        Failures worth retrying (an unknown error, a timeout) are retried with
        backoff (0.05 s doubling to 1 s) for at most ``grace_s`` seconds of wall time.
        """
        deadline = time.monotonic() + grace_s
        todo = list(self.gpus)
        done = 0
        backoff = 0.05
        while True:
            # all at once: they queue on the one worker, and a hung driver costs one
            # call bound per round, not one per GPU
            outcomes = await asyncio.gather(
                *(self._try_reset(gpu, self.monotonic(), patient=grace_s > 0) for gpu in todo))
            retry = []
            for gpu, outcome in zip(todo, outcomes, strict=True):
                if outcome:
                    done += 1
                elif outcome is False:
                    retry.append(gpu)
                gpu.locked_mhz = None
                self._show_target(gpu, 0)
            todo = retry
            if not todo or time.monotonic() + backoff > deadline:
                break
            await asyncio.sleep(backoff)
            backoff = min(2 * backoff, 1.0)
        for gpu in todo:
            log.error("GPU %d (%s): clocks may still be locked: reset kept failing; the next "
                      "agent on this node (or 'joulepool node-agent --reset-and-exit') resets "
                      "them", gpu.index, gpu.info.uuid)
        return done

    async def stop(self) -> None:
        """Reset every GPU's clocks and let go of the backend (safe to call twice)."""
        self._stopping = True
        n = await self.reset_all(self.config.reset_grace_s)  # first: nothing may delay it
        await self._refresher.cancel()
        for task in (self._publishing, self._publishing_prompts):
            if task is not None and not task.done():
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(asyncio.shield(task), timeout=2.0)
        log.info("node agent stopping: clocks reset on %d of %d GPU(s)", n, len(self.gpus))
        self.reset_count = n
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.source.close(), timeout=2.0)
        await self.gpu_io.shutdown()

    # ------------------------------------------------------------------ one period
    def _assign(self, readings: Sequence[EngineReading]) -> dict[int, list[EngineReading]]:
        """Engines per GPU: mapped ones where they say, the rest on every unclaimed GPU."""
        by_gpu: dict[int, list[EngineReading]] = {g.index: [] for g in self.gpus}
        claimed: set[int] = set()
        for r in readings:
            if r.gpus is not None:
                for i in r.gpus:
                    if i in by_gpu:
                        by_gpu[i].append(r)
                        claimed.add(i)
        unclaimed = [i for i in by_gpu if i not in claimed]
        for r in readings:
            if r.gpus is None:
                for i in unclaimed:
                    by_gpu[i].append(r)
        for gpu in self.gpus:
            rs = by_gpu[gpu.index]
            mapped = [r.gpus for r in rs if r.gpus is not None]
            gpu.group_mapped = bool(mapped)
            gpu.group = frozenset().union(*mapped) if mapped else frozenset(unclaimed)
        return by_gpu

    def _reading_pool(self, r: EngineReading) -> str | None:
        """``r``'s pool: its label, else the node's only pool in the plan."""
        if r.pool is not None:
            return r.pool
        pools = pools_on_node(self.plan.current(), self.config.node)
        return next(iter(pools)) if len(pools) == 1 else None

    def _pod_pools(self, readings: Sequence[EngineReading]) -> dict[str, tuple[str, ...]]:
        """Per discovered Ready pod (``namespace/name``), the pools it serves
        (PlanDocument.pod_pools: its own, then the guests of the shared instance it fills
        on this node), over the same pods the routing service gives the shared instances
        to: the Ready ones (``kube.pools.Router._shared_pods``), whether or not their
        metrics answer (membership is not metrics); empty without a plan. A pod that is
        not Ready is absent (:meth:`_reading_slo`: its pool's tightest on the node)."""
        doc = self.plan.current()
        if doc is None:
            return {}
        pods = [(r.pod, pool, self.config.node, r.mode) for r in readings
                if r.pod is not None and r.ready
                and (pool := self._reading_pool(r)) is not None]
        return doc.pod_pools(pods)

    def _reading_slo(self, r: EngineReading) -> tuple[float, float] | None:
        """(TTFT, TPOT) targets of one engine: the tightest of the plan's SLOs of the
        pools its pod serves (its own, and the guests of the shared instance it fills:
        :meth:`_pod_pools`, core.controllers.held_slo), not those of its pool's other
        instances; an engine without a discovered pod (given by URL) or whose pod is not
        Ready answers to its pool's tightest on this node (PlanDocument.serving_slo), as
        it may be (or become) any of them; an engine the plan does not place, to the
        fallback flags'."""
        doc = self.plan.current()
        key = self._reading_pool(r)
        if key and doc is not None and key in doc.pools:
            served = self._served.get(r.pod) if r.pod is not None else None
            return doc.held_slo(served) if served else doc.serving_slo(key, self.config.node)
        if self.config.ttft_slo_s is not None and self.config.tpot_slo_s is not None:
            return self.config.ttft_slo_s, self.config.tpot_slo_s
        return None

    def _slo(self, readings: Sequence[EngineReading]) -> tuple[float, float] | None:
        """The tightest SLO among the pools of these engines (plan first, then fallback)."""
        targets = [t for t in (self._reading_slo(r) for r in readings) if t is not None]
        if not targets:
            return None
        return min(t[0] for t in targets), min(t[1] for t in targets)

    def _profile(self, gpu: GPU, r: EngineReading) -> ServingProfile | None:
        """The built-in serving profile of ``r``'s engine on ``gpu`` (product, the pool's
        model, else the engine's, and the instance's GPU count when known), as the router
        finds it; None when there is none."""
        if gpu.product is None:
            return None
        model = self._model([r]) or gpu.model
        if not model:
            return None
        tp = len(gpu.group) if gpu.group_mapped and gpu.group else None
        return find_profile(gpu.product.name, model, tp) or \
            find_profile(gpu.product.name, model)

    def _prefill_floor(self, gpu: GPU, readings: Sequence[EngineReading],
                       controller: MIADController, margin: float) -> float | None:
        """The clock (MHz) MIAD keeps ``gpu`` at or above: for each engine, the lowest of
        MIAD's clocks at which the prompt at its recent prompt-length quantile gets its
        first token within its pool's TTFT beside the requests the engine runs now
        (``core.controllers.prefill_clock_floor`` of
        ``core.batching.unqueued_first_token_s``, the simulator's functions, on the
        engine's serving profile); the highest over the
        engines. In power mode the power limit (W) instead: the lowest of MIAD's levels
        under which the GPU keeps that clock at any batch and while prefilling
        (``core.powercap``). None when no engine gives one; why is in
        ``joulepool_miad_prefill_floor_state``."""
        clocks = self._floor_clocks(gpu, controller)
        floor: float | None = None
        tail: float | None = None
        state = FloorState.NO_HISTOGRAM
        for r in readings:
            slo = self._reading_slo(r)
            if r.prompt_tail_tokens is None or slo is None:
                if r.prompt_histogram and state is FloorState.NO_HISTOGRAM:
                    state = FloorState.NO_TRAFFIC
                continue
            profile = self._profile(gpu, r)
            if profile is None:
                state = FloorState.NO_PROFILE if floor is None else state
                continue
            f = prefill_clock_floor(
                partial(_first_token_s, profile, r.prompt_tail_tokens, r.running),
                clocks, slo[0], margin)
            if self.control == "power":  # the lowest power limit that keeps that clock
                f = controller.snap_up(power_cap_for_clock(profile, f) / profile.gpus) \
                    if f > min(clocks) else controller.lowest  # the lowest clock: no limit
            if floor is None or f > floor:
                floor, tail = f, r.prompt_tail_tokens
            state = FloorState.APPLIED
        self._floor_state(gpu, state, floor, tail)
        return floor

    def _floor_clocks(self, gpu: GPU, controller: MIADController) -> list[float]:
        """The clocks (MHz) the floor is chosen among: MIAD's, or in power mode (where MIAD
        steers watts) the product's lockable clocks."""
        if self.control == "clocks" or gpu.product is None:
            return list(controller.clocks)
        return [float(f) for f in gpu.product.supported_clocks()]

    def _floor_state(self, gpu: GPU, state: FloorState, floor_mhz: float | None,
                     prompt_tokens: float | None) -> None:
        """Show the prefill floor and why it is (not) applied; log each change once."""
        labels = self._labels(gpu)
        power = self.control == "power"
        self.metrics.prefill_floor.labels(*labels).set(0.0 if power else (floor_mhz or 0.0) * 1e6)
        self.metrics.prefill_floor_power.labels(*labels).set((floor_mhz or 0.0) if power else 0.0)
        self.metrics.prefill_floor_prompt.labels(*labels).set(prompt_tokens or 0.0)
        for st in FloorState:
            self.metrics.prefill_floor_state.labels(*labels, st.value).set(
                1 if st is state else 0)
        if gpu.floor_state is not state:
            gpu.floor_state = state
            if state is FloorState.APPLIED:
                log.info("GPU %d: MIAD keeps the %s at or above the prefill floor (%.0f %s "
                         "for prompts of %.0f tokens)", gpu.index,
                         "power limit" if power else "clock", floor_mhz or 0.0,
                         "W" if power else "MHz", prompt_tokens or 0.0)
            else:
                log.info("GPU %d: no MIAD prefill clock floor: %s", gpu.index, state.reason)

    def _model(self, readings: Sequence[EngineReading]) -> str | None:
        doc = self.plan.current()
        for r in readings:
            if r.model:
                return r.model
            if r.pool and doc is not None and r.pool in doc.pools:
                return doc.pools[r.pool].model
        return None

    async def _measure(self, gpu: GPU, now: float, tokens: float) -> None:
        labels = self._labels(gpu)
        power_w = await self.gpu_io.power_mw(gpu.index) / 1e3
        energy_mj: float | None = None
        if gpu.energy_counter:
            try:
                energy_mj = await self.gpu_io.energy_mj(gpu.index)
            except GPUError as exc:
                if exc.kind is not GPUErrorKind.NOT_SUPPORTED:
                    raise
                gpu.energy_counter = False
                self._once(f"noenergy:{gpu.index}", logging.WARNING,
                           "GPU %d has no energy counter: integrating power instead", gpu.index)
        gpu.sm_clock_mhz = await self.gpu_io.sm_clock_mhz(gpu.index)
        gpu.power_w = power_w
        if gpu.last_t is not None:
            dt = max(now - gpu.last_t, 0.0)
            if energy_mj is not None:
                d_j = counter_delta(energy_mj, gpu.last_energy_mj) / 1e3
            else:
                d_j = trapezoid_energy_j(gpu.last_power_w or power_w, power_w, dt)
            gpu.energy_j += d_j
            gpu.eps.update(d_j, tokens, dt)
            gpu.op.update(tokens, dt, gpu.sm_clock_mhz)
            # credited with the GPU's own counter, so a scrape never sees one without the other
            self.pool_meter.record({str(gpu.index): d_j}, {str(gpu.index): list(gpu.work)},
                                   self._site, self._g_per_kwh)
        gpu.last_t, gpu.last_energy_mj, gpu.last_power_w = now, energy_mj, power_w
        if gpu.eps.value is not None and gpu.model:
            self.metrics.eps.labels(*labels, gpu.model).set(gpu.eps.value)

    def miad_params(self) -> tuple[float, float, float]:
        """(k_inc, step MHz, margin): the EnergyPolicy's if it sets them, else the flags'."""
        spec = self.policy.miad() if self.policy is not None else None
        k_inc, step, margin = self.config.k_inc, self.config.step_mhz, self.config.margin
        if spec is not None:
            k_inc, step, margin = spec.k_inc, spec.step_mhz, spec.margin
        if self.control == "power":
            step = self.config.power_step_w  # MIAD's additive step is in watts there
        return k_inc, step, margin

    def control_interval(self) -> float:
        """Seconds between control periods: the EnergyPolicy's miad.periodSeconds if it
        exists, else the configured interval."""
        spec = self.policy.miad() if self.policy is not None else None
        return spec.period_seconds if spec is not None else self.config.interval_s

    def _controller(self, gpu: GPU, slo: tuple[float, float]) -> MIADController:
        params = self.miad_params()
        if gpu.controller is None or gpu.controller_slo != slo or \
                gpu.controller_params != params:
            clocks = self.control == "clocks"
            lo = gpu.product.f_min_mhz.value if gpu.product and clocks else None
            hi = gpu.product.f_max_mhz.value if gpu.product and clocks else None
            usable = [f for f in gpu.supported
                      if (lo is None or f >= lo - 1e-6) and (hi is None or f <= hi + 1e-6)]
            gpu.controller = MIADController(
                usable or gpu.supported, ttft_target_s=slo[0], tpot_target_s=slo[1],
                k_inc=params[0], step_mhz=params[1], margin=params[2])
            gpu.controller_slo = slo
            gpu.controller_params = params
        return gpu.controller

    async def _control(self, gpu: GPU, readings: Sequence[EngineReading], now: float) -> None:
        if self._stopping or self.monitor_only or not gpu.controllable or gpu.lost:
            return
        live = [r for r in readings if not r.stale]
        slo = self._slo(live) if live else None
        if slo is None:  # no engine, no SLO, or engines gone silent: hand the clock back
            if gpu.locked_mhz is not None or (gpu.needs_reset and now >= gpu.next_reset):
                await self._reset(gpu, now)
            return
        labels = self._labels(gpu)
        if any(not r.fresh for r in live):  # a missed scrape: hold, decide next period
            self.metrics.decisions.labels(*labels, Direction.HOLD.value).inc()
            return
        ttfts = [r.ttft_tail_s for r in live if r.ttft_tail_s is not None]
        mean_itls = [r.mean_itl_s for r in live if r.mean_itl_s is not None]
        signal = SLOSignal(max(ttfts) if ttfts else None,
                           max(mean_itls) if mean_itls else None,
                           sum(max(r.waiting, 0) for r in live))
        self.metrics.signal_tpot.labels(*labels).set(
            math.nan if signal.mean_itl_s is None else signal.mean_itl_s)
        controller = self._controller(gpu, slo)
        current = gpu.locked_mhz if gpu.locked_mhz is not None else controller.highest
        target, direction = controller.step(current, signal)
        floor = self._prefill_floor(gpu, live, controller, self.miad_params()[2])
        if floor is not None and target < floor:  # never below it, as the simulator's MIAD
            target = floor
            direction = Direction.UP if target > current else \
                Direction.DOWN if target < current else Direction.HOLD
        if gpu.locked_mhz is None or target != gpu.locked_mhz:
            gpu.needs_reset = True  # from the moment it is sent: a timed-out lock may land
            self._set_reset_pending(gpu)
            try:
                if self.control == "power":
                    await self.gpu_io.set_power_limit_w(gpu.index, target)
                else:
                    await self.gpu_io.set_locked_clocks(gpu.index, gpu.supported[0], target)
            except GPUError as exc:
                await self._on_error(gpu, exc, now, "lock")
                return
            gpu.locked_mhz = target
        self.metrics.decisions.labels(*labels, direction.value).inc()
        self._show_target(gpu, target)

    async def _probe_lost(self, gpu: GPU, now: float) -> None:
        if now < gpu.next_probe:
            return
        gpu.next_probe = now + self.config.lost_retry_s
        try:
            await self.gpu_io.power_mw(gpu.index)
        except GPUError:
            return
        log.warning("GPU %d (%s) answers again; resuming", gpu.index, gpu.product_name)
        gpu.lost = False
        gpu.last_t = gpu.last_energy_mj = None
        self.metrics.gpu_lost.labels(*self._labels(gpu)).set(0)
        if not self.monitor_only:
            await self._reset(gpu, now)

    def wanted_control(self) -> str:
        """The control mode asked for: the EnergyPolicy's miad.control, else the flag's."""
        spec = self.policy.miad() if self.policy is not None else None
        return spec.control if spec is not None and spec.control else self.config.control

    async def _switch_control(self) -> None:
        """Follow a change of control mode: hand every GPU back under the old mode first
        (retried briefly; on failure, stay and try again next period), then steer the new one."""
        wanted = self.wanted_control()
        if wanted == self.control or self._stopping:
            return
        if not self.monitor_only:
            left = [g for g in self.gpus if await self._try_reset(g, self.monotonic()) is False]
            if left:
                log.warning("control mode %s -> %s waits: %d GPU(s) not handed back yet",
                            self.control, wanted, len(left))
                return
        log.info("control mode %s -> %s", self.control, wanted)
        self.control = wanted
        for gpu in self.gpus:
            gpu.controller = None
            gpu.locked_mhz = None
            self._show_target(gpu, 0)
            if gpu.lost or not gpu.controllable:
                continue
            try:
                gpu.supported = await self._levels(gpu.index)
            except GPUError as exc:
                await self._on_error(gpu, exc, self.monotonic(), "levels")

    async def _retry_reset(self, gpu: GPU, now: float) -> None:
        """Retry a failed reset (also one from start-up) of a GPU we are not controlling."""
        if (gpu.needs_reset and gpu.locked_mhz is None and not gpu.controllable
                and not self.monitor_only and not self._stopping and now >= gpu.next_reset):
            await self._try_reset(gpu, now)

    async def _refresh_sources(self) -> None:
        try:
            await self.plan.refresh()
            if self.policy is not None:
                await self.policy.refresh()
        except Exception as exc:
            self._once("plan", logging.WARNING, "plan / policy refresh failed: %s", exc)
        if self.workloads is not None:
            await self.workloads.refresh()  # never raises

    def gpu_samples(self) -> list[GPUSample]:
        """Each measured GPU's latest power, energy and clock with the DCGM label set."""
        out = []
        for gpu in self.gpus:
            if gpu.lost or gpu.last_t is None:
                continue
            owner = self.workloads.owner(gpu.info.uuid) if self.workloads else None
            labels = (str(gpu.index), gpu.info.uuid, gpu.info.name, gpu.product_name,
                      self.config.node, owner.pod if owner else "",
                      owner.namespace if owner else "", owner.container if owner else "")
            out.append(GPUSample(labels, gpu.power_w, gpu.energy_j, gpu.sm_clock_mhz * 1e6))
        return out

    async def tick(self, now: float | None = None) -> None:
        """One control period (``now``: monotonic seconds, injectable for tests)."""
        t = self.monotonic() if now is None else now
        # in the background: a hung API call leaves the last good plan / policy in use
        await self._refresher.poke()
        if self._refresher.running:
            self._once("plan-slow", logging.WARNING,
                       "plan / policy refresh is slow; controlling with the last good copy")
        await self._switch_control()
        readings = await self.source.read(t)
        by_gpu = self._assign(readings)
        self._served = self._pod_pools(readings)
        self._locate()
        for gpu in self.gpus:
            if gpu.lost:
                await self._probe_lost(gpu, t)
                if gpu.lost:
                    continue
            rs = by_gpu.get(gpu.index, [])
            fresh = [r for r in rs if r.fresh]
            gpu.model = self._model(rs) or gpu.model
            gpu.work = self._work(gpu, rs)
            try:
                await self._measure(gpu, t, sum(r.tokens for r in fresh))
            except GPUError as exc:
                await self._on_error(gpu, exc, t, "read")
                continue
            await self._retry_reset(gpu, t)
            await self._control(gpu, rs, t)
        self.last_tick = self.monotonic()
        self.ticks += 1
        self._maybe_publish()
        self._count_tokens(by_gpu)
        self._maybe_publish_prompts(by_gpu)

    # ------------------------------------------------------------------ per-pool energy
    def _locate(self) -> None:
        """This node's site (from the plan) and its grid intensity now (from the policy)."""
        doc = self.plan.current()
        planned = doc.nodes.get(self.config.node) if doc is not None else None
        self._site = planned.site if planned is not None else ""
        carbon = getattr(self.policy, "carbon", None)
        self._g_per_kwh = carbon(self._site) if carbon is not None and self._site else None
        self._only_pool = None
        if doc is not None:
            pools = list(pools_on_node(doc, self.config.node))
            self._only_pool = pools[0] if len(pools) == 1 else None

    def _work(self, gpu: GPU, readings: Sequence[EngineReading]) -> tuple[Work, ...]:
        """Pool, model and site of each live engine on ``gpu`` (PoolMeter's split rule)."""
        return tuple(
            Work(r.pool or self._only_pool or "unknown", r.model or gpu.model or "unknown",
                 self._site)
            for r in readings if not r.stale)

    def _count_tokens(self, by_gpu: Mapping[int, Sequence[EngineReading]]) -> None:
        """New output tokens per engine (once, however many GPUs it spans) and engines
        per GPU, for PoolMeter; GPU energy is credited as it is metered (``_measure``)."""
        engines: dict[str, tuple[Work, float]] = {}
        for gpu in self.gpus:
            live = [r for r in by_gpu.get(gpu.index, ()) if not r.stale]
            self.pool_meter.engines(self._labels(gpu), len(live))
            for r, work in zip(live, self._work(gpu, live), strict=True):
                engines[r.engine] = (work, r.tokens if r.fresh else 0.0)
        for work, tokens in engines.values():
            self.pool_meter.tokens(work, tokens)

    # ------------------------------------------------------------------ publication
    def measurements(self) -> list[Measurement]:
        """Instance J/token per (product, model, GPUs per instance) on this node.

        A GPU's estimate is its energy per output token of the engine(s) it
        serves, so an instance's J/token is the sum over its GPUs; instances
        of one kind are averaged weighted by their token counts.
        """
        groups: dict[frozenset[int], list[GPU]] = {}
        for gpu in self.gpus:
            if gpu.lost or gpu.eps.value is None or not gpu.model or not gpu.group:
                continue
            groups.setdefault(gpu.group, []).append(gpu)
        acc: dict[tuple[str, str, int | None], list[float]] = {}
        for group, members in groups.items():
            if len(members) != len(group):
                continue  # part of the instance has no estimate yet
            product = members[0].product_name
            model = members[0].model or ""
            eps = sum(m.eps.value or 0.0 for m in members)
            samples = min(m.eps.samples for m in members)
            # an instance's GPUs see the same engine's tokens: its rate; their mean clock
            tps = members[0].op.tokens_per_second or 0.0
            clock = sum(m.op.clock_mhz or 0.0 for m in members) / len(members)
            per_instance = len(group) if members[0].group_mapped else None
            sums = acc.setdefault((product, model, per_instance), [0.0, 0.0, 0.0, 0.0])
            for j, v in enumerate((eps, 1.0, tps, clock)):
                sums[j] += v * samples
        return [
            Measurement(product=p, model=m, gpus=g, joules_per_token=e / n, samples=round(n),
                        node=self.config.node, tokens_per_second=(t / n) or None,
                        clock_mhz=(c / n) or None)
            for (p, m, g), (e, n, t, c) in sorted(acc.items(), key=lambda kv: str(kv[0]))
            if n > 0
        ]

    def _maybe_publish(self) -> None:
        if self.publisher is None:
            return
        if self._publishing is not None and not self._publishing.done():
            return
        ms = self.measurements()
        if not ms:
            return
        publisher = self.publisher

        def work() -> None:
            for m in ms:
                try:
                    ok = publisher.publish(m)
                    if ok:
                        self.metrics.published.labels(self.config.node, "ok").inc()
                except Exception as exc:  # API down, conflict: try again next time
                    self.metrics.published.labels(self.config.node, "error").inc()
                    self._once(f"publish:{type(exc).__name__}", logging.WARNING,
                               "cannot publish J/token to GPUProfile: %s", exc)

        self._publishing = asyncio.get_running_loop().create_task(asyncio.to_thread(work))

    def prompt_counts(self, by_gpu: Mapping[int, Sequence[EngineReading]]
                      ) -> list[PromptCounts]:
        """Per pool, the prompt-length histograms of its engines on this node, summed
        (engines whose bucket layout differs from the pool's first one are left out)."""
        engines = {r.engine: r for rs in by_gpu.values() for r in rs
                   if r.fresh and not r.stale and r.prompts is not None}
        sums: dict[str, tuple[tuple[float, ...], list[float]]] = {}
        for r in engines.values():
            pool = r.pool or self._only_pool
            hist = r.prompts
            if pool is None or "." not in pool or hist is None:
                continue
            bounds = tuple(b for b in hist.bounds if math.isfinite(b))
            if len(bounds) != len(hist.bounds) - 1 or not bounds:
                continue  # a page without its +Inf bucket
            have = sums.setdefault(pool, (bounds, [0.0] * len(hist.counts)))
            if have[0] == bounds:
                for i, c in enumerate(hist.counts):
                    have[1][i] += c
        return [PromptCounts(pool, self.config.node, b, tuple(c))
                for pool, (b, c) in sorted(sums.items()) if c[-1] > 0]

    def _maybe_publish_prompts(self, by_gpu: Mapping[int, Sequence[EngineReading]]) -> None:
        publisher = self.prompt_publisher
        if publisher is None or (self._publishing_prompts is not None
                                 and not self._publishing_prompts.done()):
            return
        due = [c for c in self.prompt_counts(by_gpu) if publisher.due(c.pool)]
        if not due:
            return

        def work() -> None:
            for c in due:
                try:
                    publisher.publish(c)
                except Exception as exc:  # API down, conflict: try again next time
                    self._once(f"prompts:{type(exc).__name__}", logging.WARNING,
                               "cannot publish the prompt lengths of pool %s: %s", c.pool, exc)

        self._publishing_prompts = asyncio.get_running_loop().create_task(
            asyncio.to_thread(work))

    # ------------------------------------------------------------------ the loop
    async def run(self, stop: asyncio.Event) -> None:
        """Tick every ``interval_s`` until ``stop`` is set, then reset every GPU."""
        next_t = self.monotonic()
        stopping = asyncio.ensure_future(stop.wait())
        ticking: asyncio.Future[None] | None = None
        try:
            while not stop.is_set():
                start = self.monotonic()
                lag = max(start - next_t, 0.0)
                self.lags.append(lag)
                self.metrics.tick_lag.labels(self.config.node).observe(lag)
                ticking = asyncio.ensure_future(self.tick(start))
                await asyncio.wait({ticking, stopping}, timeout=self.config.tick_timeout,
                                   return_when=asyncio.FIRST_COMPLETED)
                if not ticking.done():  # stopping, or the period hangs: abandon it
                    ticking.cancel()
                    await asyncio.wait({ticking}, timeout=1.0)
                    if stop.is_set():
                        break
                    log.error("control period took over %.1f s; resetting every GPU's clocks",
                              self.config.tick_timeout)
                    self.metrics.control_errors.labels("all", "", self.config.node).inc()
                    await self.reset_all()
                elif ticking.cancelled() or ticking.exception() is not None:
                    exc = None if ticking.cancelled() else ticking.exception()
                    log.error("control period failed; resetting every GPU's clocks",
                              exc_info=exc)
                    self.metrics.control_errors.labels("all", "", self.config.node).inc()
                    await self.reset_all()
                self.metrics.tick_seconds.labels(self.config.node).observe(
                    self.monotonic() - start)
                next_t += self.control_interval()
                if next_t < self.monotonic():  # overran: skip the missed periods
                    next_t = self.monotonic()
                await asyncio.wait({stopping}, timeout=max(next_t - self.monotonic(), 0.0))
        finally:
            stopping.cancel()
            if ticking is not None and not ticking.done():
                ticking.cancel()
            await self.stop()
