"""One step of a continuous-batching engine with chunked prefill (vLLM V1's scheduler).

A step carries one token for each of the ``batch`` decoding requests and, while a
prompt is being prefilled, a chunk of that prompt: what is left of the token budget
(``max_num_batched_tokens``) after the decode tokens. The simulated engine
(``sim/instance.py``) times every step with these functions and the serving model
(:meth:`joulepool.core.profiles.ServingProfile.serving_point`) sizes instances with
them, so the two cannot drift apart. Scalar and allocation-light: the simulator calls
them once per engine event; :func:`prefill_times_s` is :func:`prefill_time_s` over an
array of prompts (the planner's prompt-length points).
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt


def prefill_chunk_tokens(budget_tokens: float, batch: float, prompt_tokens: float) -> float:
    """Prompt tokens one step carries beside ``batch`` decode tokens under a budget of
    ``budget_tokens`` per step: the budget left, at most the whole prompt, at least 1
    (a step always makes progress on the prompt, as vLLM's scheduler does)."""
    chunk = float(budget_tokens - batch)
    if chunk > prompt_tokens:
        return prompt_tokens
    if chunk < 1.0:
        return 1.0
    return chunk


def mixed_step(decode_s: float, decode_w: float, chunk_tokens: float,
               prefill_s_per_token: float, prefill_w: float) -> tuple[float, float]:
    """(seconds, mean W) of one step: a decode step of ``decode_s`` s at ``decode_w`` W
    (``decode_s`` = 0: nothing decoding) plus a prompt chunk of ``chunk_tokens`` tokens
    prefilled at ``prefill_s_per_token`` s/token and ``prefill_w`` W.

    The parts add up in time and in energy: the step lasts ``decode_s + chunk x
    prefill_s_per_token`` and draws each part's power for its part of the step
    (docs/simulator.md, "A mixed step"). ``chunk_tokens`` = 0 is a pure decode step.
    """
    prefill_s = chunk_tokens * prefill_s_per_token
    if decode_s <= 0.0:
        return prefill_s, prefill_w
    step_s = decode_s + prefill_s
    return step_s, (decode_s * decode_w + prefill_s * prefill_w) / step_s


def prefill_steps(budget_tokens: float, batch: float, prompt_tokens: float) -> float:
    """Steps a prompt of ``prompt_tokens`` takes to prefill beside ``batch`` decoding
    requests: prompt / chunk, at least 1 (fluid: the last, partial chunk is taken at the
    same rate, as the simulator does)."""
    if prompt_tokens <= 0.0:
        return 0.0
    return prompt_tokens / prefill_chunk_tokens(budget_tokens, batch, prompt_tokens)


def prefill_time_s(budget_tokens: float, batch: float, prompt_tokens: float,
                   decode_s: float, prefill_s_per_token: float) -> float:
    """Seconds to prefill ``prompt_tokens`` in mixed steps beside ``batch`` decoding
    requests whose decode step alone takes ``decode_s`` (ignored when ``batch`` = 0):
    the prompt's own compute plus one decode step per chunk (TTFT's service time)."""
    own = prompt_tokens * prefill_s_per_token
    if batch <= 0.0:
        return own
    return own + decode_s * prefill_steps(budget_tokens, batch, prompt_tokens)


def first_token_after_s(wait_s: float, step_s: float, chunk_tokens: float,
                        prefill_s_per_token: float, prompt_tokens: float) -> float:
    """Seconds to a prompt's first token when its prefill starts after ``wait_s`` s and
    runs in steps of ``step_s`` s (the decode step beside it; 0: nothing decoding), each
    carrying ``chunk_tokens`` of its ``prompt_tokens`` tokens (at least one step), at
    ``prefill_s_per_token`` s per prompt token of its own compute:

        wait + max(1, l / chunk) x step + l x prefill_s

    The one formula of a first token: :func:`unqueued_first_token_s` (the simulator's
    and the node agent's prefill clock floor) calls it, the router's per-endpoint checks
    (``core.routing.endpoint_late``) too, and ``core.routing.first_token_s`` is it over
    arrays of endpoints with the same floating-point operations (so the same values bit
    for bit: ``chunk_tokens`` = 0 divides as numpy does, NaN stays NaN)."""
    if chunk_tokens:
        steps = prompt_tokens / chunk_tokens
    else:  # numpy's x / 0
        steps = math.nan if prompt_tokens == 0.0 or prompt_tokens != prompt_tokens else \
            math.copysign(math.inf, prompt_tokens) * math.copysign(1.0, chunk_tokens)
    if steps < 1.0:  # np.maximum(steps, 1): NaN stays NaN
        steps = 1.0
    first = wait_s + steps * step_s
    first += prefill_s_per_token * prompt_tokens
    return first


def unqueued_first_token_s(budget_tokens: float, batch: float, prompt_tokens: float,
                           decode_s: float, prefill_s_per_token: float) -> float:
    """Seconds from a prompt's arrival to its first token on an engine decoding ``batch``
    requests (decode step ``decode_s`` s) with no other prompt queued ahead of it
    (:func:`first_token_after_s`): the step in progress (one decode step; none when
    idle), then its prefill in mixed steps of ``decode_s`` beside the batch, each
    carrying what the budget of ``budget_tokens`` per step leaves (at least one token)."""
    step = decode_s if batch > 0.0 else 0.0
    chunk = budget_tokens - batch
    if chunk < 1.0:  # NaN stays
        chunk = 1.0
    return first_token_after_s(step, step, chunk, prefill_s_per_token, prompt_tokens)


def prefill_times_s(budget_tokens: float, batch: float, prompt_tokens: npt.ArrayLike,
                    decode_s: float, prefill_s_per_token: float) -> npt.NDArray[np.float64]:
    """:func:`prefill_time_s` (seconds) of each of ``prompt_tokens`` (tokens), in one
    numpy pass: the same operations per prompt, so the same values (the planner's
    thousand prompt-length points per class and mode, where a Python loop dominated
    building the problem)."""
    prompts = np.asarray(prompt_tokens, dtype=np.float64)
    own = prompts * prefill_s_per_token
    if batch <= 0.0:
        return own
    chunk = float(budget_tokens - batch)  # prefill_chunk_tokens, prompt by prompt
    chunks = np.where(chunk > prompts, prompts, 1.0 if chunk < 1.0 else chunk)
    # prefill_steps: 0 for an empty prompt (NaN stays NaN, as the scalar form)
    steps = np.divide(prompts, chunks, out=np.zeros_like(prompts), where=~(prompts <= 0.0))
    out: npt.NDArray[np.float64] = own + decode_s * steps
    return out
