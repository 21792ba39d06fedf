"""Every formula of joulepool, once: pure, typed functions and small state machines.

The operator, scheduler extender, router, node agent and simulator are thin shells
around this package; ``core`` imports nothing else of joulepool and no Kubernetes,
HTTP, gRPC, Prometheus or pydantic (import-linter contracts in ``pyproject.toml``).
Simulated and wall time come in as arguments (``now``, seconds); the only clock read
here is ``time.perf_counter()`` for the planner's and the sizing's solve-time budgets.

Where things are (rationale in ``docs/architecture.md`` and the pages it links):

* GPU x model performance and energy: :mod:`.profiles` (every figure with its source;
  the clock law, ``docs/clock-law.md``), :mod:`.batching` (one engine step with chunked
  prefill), :mod:`.powercap`;
* requests: :mod:`.classes` (tiers, FREESH's classes, SLO sets, prompt lengths),
  :mod:`.llf` (least-laxity-first order);
* routing: :mod:`.cost` (the JouleSched cost), :mod:`.routing` (its inputs: marginal
  energy, first-token prediction, rooms, overflow; ``docs/marginal-energy.md``),
  :mod:`.scoring` (plugins), :mod:`.router` (one pool's router state machine),
  :mod:`.replicas` (counts across router replicas);
* planning: :mod:`.problem` (the planner's problem from the serving model),
  :mod:`.planner` (the MILP), :mod:`.sizing` (headroom and pool-level sizes),
  :mod:`.queueing` (M/G/n prefill queue), :mod:`.highs` (HiGHS's stray output);
  ``docs/planner.md``;
* control and measurement: :mod:`.controllers` (PI lambda, MIAD clocks),
  :mod:`.estimators` and :mod:`.online` (eps from counters and completions),
  :mod:`.feedback` (measured J/token into the profiles), :mod:`.attribution` (GPU energy
  to pools), :mod:`.device` (the GPU backend interface);
* judging schedules: :mod:`.bound` (the energy floor), :mod:`.metrics` (fairness,
  confidence intervals), :mod:`.energy` (unit conversions).

Units are in the names where they matter: ``_s`` seconds, ``_j`` joules, ``_w`` watts,
``_mhz`` SM clock in MHz, ``_rps`` requests per second, ``_tps`` tokens per second,
``g_per_kwh`` grams of CO2 per kWh; where a name carries none, its docstring says it.
Token counts are floats where they are means.
"""
