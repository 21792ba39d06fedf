"""The prefill queue of a pool of instances fed by a soonest-start router (M/G/n).

Both routers (least-loaded and JouleSched) send each prompt to the instance that
starts it soonest, so n instances that each prefill one prompt at a time queue
like ONE queue with n servers, not like n queues of one server each. With Poisson
arrivals at total rate ``n lam`` and prefill service time S (mean E[S], squared
coefficient of variation c^2), the utilisation is rho = lam E[S] per instance and
the offered load a = n rho.

* Erlang C, C(n, a): the probability that an arriving prompt finds all n servers
  busy (exact for M/M/n; kept as the wait probability for M/G/n by the
  Allen-Cunneen approximation).
* Conditional wait: exponential with mean E[S] (1 + c^2) / (2 n (1 - rho)) (the
  M/M/n conditional mean 1 / (n mu - n lam) scaled by Allen-Cunneen's
  (c_a^2 + c_s^2) / 2 with c_a^2 = 1 for Poisson arrivals). Hence

      P(W > x) ~= C(n, a) exp(-2 n (1 - rho) x / (E[S] (1 + c^2)))
      E[W]     ~= C(n, a) E[S] (1 + c^2) / (2 n (1 - rho))

  At n = 1, C(1, a) = rho: the M/G/1 tail and Pollaczek-Khinchine mean wait the
  per-instance model used (exact for M/M/1). docs/planner.md "Pool-level TTFT"
  gives the references (Allen 1990; Whitt 1993, "Approximations for the GI/G/m
  queue"; Tijms 2003) and the simulator check.
"""

from __future__ import annotations

import math

from scipy.special import gammaincc

__all__ = [
    "conditional_wait_s",
    "erlang_c",
    "pool_mean_wait_s",
    "pool_wait_tail",
    "wait_probability",
]


def erlang_c(servers: int, offered: float) -> float:
    """C(n, a): the probability an arrival waits in an M/M/n queue with ``servers`` = n
    servers and offered load ``offered`` = a = arrival rate x mean service time.

    1.0 when a >= n (unstable), 0.0 when a <= 0; C(1, a) = a exactly. Computed from
    Erlang B = Poisson pmf(n; a) / Poisson cdf(n; a) (the cdf as the regularised upper
    incomplete gamma Q(n + 1, a), at least about 1/2 whenever a < n), so it costs the
    same at n = 10,000 as at n = 2.
    """
    n = int(servers)
    if n < 1:
        raise ValueError("a pool has at least one server")
    a = float(offered)
    if a <= 0.0:
        return 0.0
    if a >= n:
        return 1.0
    if n == 1:
        return a
    log_pmf = n * math.log(a) - a - math.lgamma(n + 1.0)
    blocking = math.exp(log_pmf) / float(gammaincc(n + 1.0, a))
    rho = a / n
    return min(blocking / (1.0 - rho * (1.0 - blocking)), 1.0)


def wait_probability(servers: int, rho: float) -> float:
    """P(W > 0): C(n, n rho) for ``servers`` = n instances each at utilisation ``rho``
    (rho itself at n = 1, 1.0 at rho >= 1)."""
    return 1.0 if rho >= 1.0 else erlang_c(servers, int(servers) * rho)


def conditional_wait_s(servers: int, rho: float, mean_s: float, scv: float) -> float:
    """Mean wait of a prompt that waits, s: E[S] (1 + c^2) / (2 n (1 - rho)) (module doc);
    inf at rho >= 1."""
    if rho >= 1.0:
        return math.inf
    return mean_s * (1.0 + scv) / (2.0 * int(servers) * (1.0 - rho))


def pool_wait_tail(servers: int, rho: float, slack_s: float, mean_s: float,
                   scv: float) -> float:
    """P(W > ``slack_s``): a prompt's wait for one of ``servers`` instances (module doc).

    ``rho``: utilisation of each instance's prefill (per-instance arrival rate x
    ``mean_s``, the mean prefill time, s); ``scv``: the prefill time's squared
    coefficient of variation. 1.0 when rho >= 1; C(n, n rho) at zero slack.
    """
    if rho >= 1.0:
        return 1.0
    if rho <= 0.0 or mean_s <= 0.0:
        return 0.0
    n = int(servers)
    if n == 1:  # the per-instance M/G/1 form the model used, operation for operation
        return rho * math.exp(-2.0 * (1.0 - rho) * slack_s / (mean_s * (1.0 + scv)))
    return wait_probability(n, rho) * math.exp(
        -max(slack_s, 0.0) / conditional_wait_s(n, rho, mean_s, scv))


def pool_mean_wait_s(servers: int, rho: float, mean_s: float, scv: float) -> float:
    """E[W], s: a prompt's mean wait for one of ``servers`` instances (module doc); the
    Pollaczek-Khinchine mean rho E[S] (1 + c^2) / (2 (1 - rho)) at one. inf at rho >= 1."""
    if rho >= 1.0:
        return math.inf
    if rho <= 0.0:
        return 0.0
    n = int(servers)
    if n == 1:  # the Pollaczek-Khinchine form the model used, operation for operation
        return rho * mean_s * (1.0 + scv) / (2.0 * (1.0 - rho))
    return wait_probability(n, rho) * conditional_wait_s(n, rho, mean_s, scv)
