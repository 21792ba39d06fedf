"""Core's performance and power model, tabulated once per serving profile.

The event loop must not call numpy per event, so every quantity it needs is
evaluated here by :mod:`joulepool.core.profiles` over the whole grid (every
supported SM clock x every batch 0..max) and read back by index. Nothing is
derived here: each table entry is a core function value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from functools import cached_property

import numpy as np
import numpy.typing as npt

from joulepool.core.controllers import MIADController, miad_step_target_s
from joulepool.core.profiles import KV_WATERMARK, ServingProfile, default_batched_tokens
from joulepool.core.routing import (
    excess_at_needed_clock,
    excess_step_j,
    marginal_decode_j_per_token,
    prefill_excess_j_per_token,
)

#: :meth:`ProfileTable.excess_row`'s clock index for "the clock the batch needs"
NEEDED = -1


@dataclass(frozen=True)
class ProfileTable:
    profile: ServingProfile
    clocks: tuple[float, ...]  # ascending supported SM clocks, MHz
    itl_s: tuple[tuple[float, ...], ...]  # [clock][batch]; batch 0 holds batch 1's value
    power_w: tuple[tuple[float, ...], ...]  # [clock][batch]; batch 0 = idle
    tps: tuple[tuple[float, ...], ...]  # decode tokens/s [clock][batch]; batch 0 = batch 1's
    prefill_s_per_token: tuple[float, ...]  # [clock]
    prefill_power_w: tuple[float, ...]  # [clock]
    eps_j_per_token: tuple[float, ...]  # [clock]: J/token at the operating batch
    operating_batch: tuple[int, ...]  # [clock]: largest batch meeting the TPOT target
    excess_step_j: tuple[tuple[float, ...], ...]  # [clock][batch]: J above idle per step
    prefill_excess_j: tuple[float, ...]  # [clock]: J above idle per prompt token
    max_batch: int
    gpus: int
    gpu_idle_w: float
    batched_tokens: int = 8192  # vLLM V1's max_num_batched_tokens default for the GPU
    kv_watermark: float = KV_WATERMARK.value  # share of the KV cache admission leaves free
    #: [batch]: J above idle per step at the lowest clock whose step meets MIAD's TPOT
    #: target (core.routing.excess_at_needed_clock): X(b) where the clock follows the load
    excess_needed_j: tuple[float, ...] = ()
    #: s: the TPOT target the operating batch and :attr:`excess_needed_j` are for
    tpot_target_s: float = math.nan
    #: the MIAD margin :attr:`excess_needed_j` is for: MIAD holds the step at
    #: (1 - margin) x :attr:`tpot_target_s` (core.controllers.miad_step_target_s)
    miad_margin: float = MIADController.margin
    #: marginal_eps_row's rows, by (clock index, b*), filled as the run asks for them
    _marginal: dict[tuple[int, int], tuple[float, ...]] = field(
        default_factory=dict, init=False, repr=False, compare=False)

    @property
    def top(self) -> int:
        """Index of f_max."""
        return len(self.clocks) - 1

    @cached_property
    def mode(self) -> str:
        """The profile's serving-mode name (e.g. ``4xH100``), formatted once: the event
        loop reads it per MIAD step and routing-row refresh."""
        return self.profile.mode

    @cached_property
    def _clock_indices(self) -> dict[float, int]:
        """MHz -> its first index in :attr:`clocks`."""
        out: dict[float, int] = {}
        for ci, f in enumerate(self.clocks):
            out.setdefault(f, ci)
        return out

    def clock_index(self, mhz: float) -> int:
        """The index of ``mhz`` in :attr:`clocks` (``clocks.index``, from a dict: MIAD
        moves clocks every period); ValueError when it is not one of them."""
        ci = self._clock_indices.get(mhz)
        if ci is None:
            raise ValueError(f"{mhz} MHz is not a clock of {self.mode}")
        return ci

    def with_miad_margin(self, margin: float) -> ProfileTable:
        """This table with :attr:`excess_needed_j` at the clocks MIAD holds under
        ``margin`` (a run's ``EngineParams.miad_margin``); itself when it already is."""
        if margin == self.miad_margin:
            return self
        return replace(self, miad_margin=margin, excess_needed_j=_excess_needed(
            np.asarray(self.itl_s), np.asarray(self.excess_step_j), self.tpot_target_s,
            margin))

    def excess_row(self, ci: int) -> tuple[float, ...]:
        """X(b) by batch at clock index ``ci``, or with ``ci`` = :data:`NEEDED` at the clock
        each batch needs (:attr:`excess_needed_j`)."""
        return self.excess_needed_j if ci == NEEDED else self.excess_step_j[ci]

    def marginal_eps_row(self, ci: int, carry: int) -> tuple[float, ...]:
        """eps_n (J per output token, core.routing.marginal_decode_j_per_token) at clock
        index ``ci`` (:meth:`excess_row`) with b*_n = ``carry``, indexed by the requests
        in flight k = 0..b*_n (from b*_n on it stays at the last entry)."""
        row = self._marginal.get((ci, carry))
        if row is None:
            xs = self.excess_row(ci)
            row = self._marginal[(ci, carry)] = tuple(
                marginal_decode_j_per_token(xs, k, carry) for k in range(carry + 1))
        return row


def _excess_needed(itl_s: npt.NDArray[np.float64], excess_j: npt.NDArray[np.float64],
                   tpot_target_s: float, miad_margin: float) -> tuple[float, ...]:
    """[batch]: X(b) at the lowest clock whose step meets MIAD's target for this TPOT
    and margin (``itl_s``, ``excess_j``: [clock][batch], s and J)."""
    return tuple(float(v) for v in excess_at_needed_clock(
        itl_s, excess_j, miad_step_target_s(tpot_target_s, miad_margin)))


def build_table(profile: ServingProfile, tpot_target_s: float,
                miad_margin: float = MIADController.margin) -> ProfileTable:
    """Tabulate ``profile``; ``tpot_target_s`` (s) fixes the operating batch behind eps,
    and with ``miad_margin`` (MIAD's, as ``EngineParams.miad_margin``) the clock each
    batch needs (:attr:`ProfileTable.excess_needed_j`)."""
    clocks = profile.product.supported_clocks()
    max_b = int(profile.max_batch.value)
    batches = np.arange(0, max_b + 1, dtype=np.float64)
    b1 = np.maximum(batches, 1.0)
    f = clocks[:, None]
    itl = profile.itl_s(b1[None, :], f)
    power = profile.power_w(batches[None, :], f)
    tps = profile.decode_tokens_per_s(b1[None, :], f)
    pf = profile.prefill_s(1.0, clocks)
    pf_power = profile.prefill_power_w(clocks)
    op = [max(profile.best_batch(tpot_target_s, float(c)), 1) for c in clocks]
    eps = [float(profile.joules_per_token(b, float(c))) for b, c in zip(op, clocks, strict=True)]
    excess = excess_step_j(power, profile.idle_w, itl)
    excess[:, 0] = 0.0
    pf_excess = prefill_excess_j_per_token(pf_power, profile.idle_w, pf)

    def rows(a: np.ndarray) -> tuple[tuple[float, ...], ...]:
        full = np.broadcast_to(a, (clocks.size, max_b + 1))
        return tuple(tuple(float(v) for v in r) for r in full)

    return ProfileTable(
        profile=profile,
        clocks=tuple(float(c) for c in clocks),
        itl_s=rows(itl),
        power_w=rows(power),
        tps=rows(tps),
        prefill_s_per_token=tuple(float(v) for v in np.broadcast_to(pf, clocks.shape)),
        prefill_power_w=tuple(float(v) for v in np.broadcast_to(pf_power, clocks.shape)),
        eps_j_per_token=tuple(eps),
        operating_batch=tuple(op),
        excess_step_j=rows(excess),
        prefill_excess_j=tuple(float(v) for v in np.broadcast_to(pf_excess, clocks.shape)),
        max_batch=max_b,
        gpus=profile.gpus,
        gpu_idle_w=profile.product.idle_w.value,
        batched_tokens=default_batched_tokens(profile.product),
        excess_needed_j=_excess_needed(itl, excess, tpot_target_s, miad_margin),
        tpot_target_s=tpot_target_s,
        miad_margin=miad_margin,
    )
