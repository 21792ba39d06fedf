"""``joulepool simulate``: a trace-driven simulator of LLM serving on heterogeneous GPUs.

* :mod:`.trace` - the bundled Azure 2023 conversation trace, or any CSV like it;
* :mod:`.workload` - arrivals (replay or scaled NHPP), tiers, classes, SLOs;
* :mod:`.cluster` - joulesched-320, freesh-3site and ``--cluster FILE``;
* :mod:`.tables` - core's profiles tabulated over clocks and batches;
* :mod:`.planning` - core's FREESH planner over the run's windows;
* :mod:`.engine` - the event-driven continuous-batching engine;
* :mod:`.policies` - round-robin ... combined and the ablations;
* :mod:`.runner` - repeats, parallel runs, the energy floor (core.bound);
* :mod:`.report`, :mod:`.plots` - table, JSON and PNGs; :mod:`.cli` - the command.

Every formula (latency, power, cost, controllers, LLF, planner, floor,
fairness) comes from :mod:`joulepool.core`.
"""
