"""Next-token selection, numpy only, with transformers' semantics and order.

transformers (generation/utils.py `_get_logits_processor`, generation/logits_process.py) applies,
for do_sample=True and one sequence:

    RepetitionPenaltyLogitsProcessor   every id already in the sequence (prompt included):
                                       s < 0 ? s * p : s / p
    TemperatureLogitsWarper            s / T
    TopKLogitsWarper                   keep s >= k-th largest (ties kept)
    TopPLogitsWarper                   sort ascending, drop while cumulative softmax <= 1 - top_p
                                       (the largest token is always kept)
    MinPLogitsWarper                   drop p < min_p * max(p) (the largest is always kept)
    softmax -> multinomial

temperature == 0 means greedy: argmax after the repetition penalty (HF's do_sample=False).
Everything runs in float32 like HF's scores (cumulative sums in float64); filtered tokens are
dropped (HF: -inf, probability 0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import numpy as np

# generation_config.json of Llama-3.2-11B-Vision-Instruct (also stored in the GGUF by the converter)
DEFAULT_TEMPERATURE = 0.6
DEFAULT_TOP_P = 0.9


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _is_num(x) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool) and math.isfinite(x)


# What each sampling option accepts: (test, requirement). SamplingParams and the command line
# (mllama_q/cli/args.py, in its own flag names) both check values through this one table.
LIMITS = {
    "temperature": (lambda v: _is_num(v) and v >= 0, "a finite number >= 0"),
    "top_k": (lambda v: _is_int(v) and v >= 0, "an integer >= 0 (0 disables it)"),
    "top_p": (lambda v: _is_num(v) and 0.0 < v <= 1.0, "in (0, 1]"),
    "min_p": (lambda v: _is_num(v) and 0.0 <= v <= 1.0, "in [0, 1]"),
    "repetition_penalty": (lambda v: _is_num(v) and v > 0, "a finite number > 0"),
    "seed": (lambda v: v is None or (_is_int(v) and v >= 0), "an integer >= 0"),  # None: random
}


def check_value(name: str, value, label: str | None = None) -> None:
    """Raise ValueError "<label> must be <requirement>, got <value>" unless LIMITS[name] accepts it."""
    ok, need = LIMITS[name]
    if not ok(value):
        raise ValueError(f"{label or name} must be {need}, got {value!r}")


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 = greedy; top_k 0 = off; top_p 1 = off; min_p 0 = off; repetition_penalty 1 = off."""

    temperature: float = DEFAULT_TEMPERATURE
    top_k: int = 0
    top_p: float = DEFAULT_TOP_P
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        for name in LIMITS:
            check_value(name, getattr(self, name))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def apply_repetition_penalty(scores: np.ndarray, history: Iterable[int], penalty: float) -> np.ndarray:
    """scores float32 [V]; every id seen in `history` is penalised once (HF gathers unique ids).

    Ids outside the logits (mllama's <|image|> = vocab_size, an embedding row with no output
    row) take no penalty: transformers' RepetitionPenaltyLogitsProcessor clamps them to an extra
    padded column and drops it (generation/logits_process.py, transformers 5)."""
    if penalty == 1.0:
        return scores
    ids = np.unique(np.fromiter(history, dtype=np.int64))
    ids = ids[(ids >= 0) & (ids < scores.shape[-1])]  # the <|image|> token (embedding row vocab_size) has no score
    if ids.size == 0:
        return scores
    out = scores.copy()
    s = out[ids]
    with np.errstate(over="ignore"):  # a score pushed to +-inf is handled by filter_logits
        out[ids] = np.where(s < 0, s * np.float32(penalty), s / np.float32(penalty))
    return out


def filter_logits(scores: np.ndarray, params: SamplingParams) -> tuple[np.ndarray, np.ndarray]:
    """Temperature, top-k, top-p, min-p on float32 scores [V] (repetition penalty already applied).

    Returns (ids int64 [n], logits float32 [n]): the surviving tokens and their scaled logits;
    every other token is HF's -inf. Only the survivors of each step are looked at by the next
    one, so with top-k, or with a peaked distribution under top-p, nothing sorts the whole
    vocabulary (128k entries; a full sort per token costs tens of ms).
    """
    x = scores.astype(np.float32, copy=False)
    if params.temperature != 1.0:
        with np.errstate(over="ignore"):
            x = x / np.float32(params.temperature)
    if np.isposinf(x.max()):  # exp(inf - inf) would make every probability NaN
        if np.isposinf(scores.max()):  # infinite scores: the limit is uniform over them
            ids = np.flatnonzero(np.isposinf(scores))
            return ids, np.zeros(ids.size, dtype=np.float32)
        # a tiny temperature (1e-45) overflowed float32: scale the max-shifted scores instead
        # (softmax and every filter below are shift-invariant; the scaled values stay <= 0)
        s64 = scores.astype(np.float64)
        with np.errstate(over="ignore"):  # far below the max: -inf, probability 0
            x = ((s64 - s64.max()) / params.temperature).astype(np.float32)
    elif np.isneginf(x.max()):
        # every score went to -inf (a huge repetition penalty or a tiny temperature on finite
        # logits overflowed): nothing tells them apart any more, so they share the mass
        return np.arange(x.size), np.zeros(x.size, dtype=np.float32)
    ids = None  # None = every token
    if params.top_k > 0 and params.top_k < x.size:
        kth = x[np.argpartition(x, x.size - params.top_k)[x.size - params.top_k :]].min()
        ids = np.flatnonzero(x >= kth)  # HF: remove s < k-th largest (ties survive)
    if ids is None:
        ids = np.arange(x.size)
    v = x[ids]
    if params.top_p < 1.0 and v.size > 1:
        keep = _top_p_keep(_softmax(v), params.top_p)
        ids, v = ids[keep], v[keep]
    if params.min_p > 0.0 and v.size > 1:
        p = _softmax(v)
        keep = p >= np.float32(params.min_p) * p.max()  # HF: remove p < min_p * max(p)
        ids, v = ids[keep], v[keep]
    return ids, v


def _top_p_keep(p: np.ndarray, top_p: float, first: int = 1024) -> np.ndarray:
    """Indices into p to keep. HF sorts ascending and removes tokens whose cumulative probability
    is <= 1 - top_p; equivalently (the total is 1) a token is kept iff the probability mass of
    the tokens ranked above it is < top_p. Tries the `first` most likely tokens, falls back to a
    full sort when they do not hold top_p of the mass."""
    n = p.size
    if n > first:
        part = np.argpartition(p, n - first)[n - first :]
        order = part[np.argsort(-p[part], kind="stable")]
    else:
        order = np.argsort(-p, kind="stable")
    pd = p[order].astype(np.float64)
    above = np.cumsum(pd) - pd  # mass strictly above each token
    if n > first and above[-1] + pd[-1] < top_p:  # the candidates do not reach top_p: sort everything
        order = np.argsort(-p, kind="stable")
        pd = p[order].astype(np.float64)
        above = np.cumsum(pd) - pd
    return order[above < top_p]


def _softmax(x: np.ndarray) -> np.ndarray:
    """float32 softmax."""
    m = np.max(x)
    e = np.exp(x - m, dtype=np.float32)
    return e / e.sum(dtype=np.float32)


def _without_nan(logits: np.ndarray) -> np.ndarray:
    """NaN scores (a broken logit row) become -inf: never sampled, never the argmax (numpy's
    argmax would pick the first NaN; a NaN in the softmax makes every probability NaN)."""
    nan = np.isnan(logits)
    return np.where(nan, np.float32(-np.inf), logits) if nan.any() else logits


def probabilities(scores: np.ndarray, history: Iterable[int], params: SamplingParams) -> np.ndarray:
    """The sampling distribution float32 [V] for these logits (what multinomial draws from)."""
    s = _without_nan(np.asarray(scores, dtype=np.float32))
    s = apply_repetition_penalty(s, history, params.repetition_penalty)
    out = np.zeros(s.size, dtype=np.float32)
    if params.greedy:  # temperature 0: all the mass on the argmax (dividing by 0 gave NaNs)
        out[int(np.argmax(s))] = 1.0
        return out
    ids, v = filter_logits(s, params)
    out[ids] = _softmax(v)
    return out


def core_params(params: SamplingParams, u: float) -> tuple:
    """The parameter tuple the compiled sampler takes (_core: MllamaModel.step, Backend.sample,
    sample_probs): (temperature, top_k, top_p, min_p, repetition_penalty, u)."""
    # top_k >= the vocabulary keeps every token (as 0 does): any value past int32 means the same
    # and must not overflow the core's int32 field.
    return (
        float(params.temperature),
        min(int(params.top_k), 2**31 - 1),
        float(params.top_p),
        float(params.min_p),
        float(params.repetition_penalty),
        float(u),
    )


class Sampler:
    """Stateful sampler: one per generation (owns the seeded RNG)."""

    def __init__(self, params: SamplingParams):
        self.params = params
        self.rng = np.random.default_rng(params.seed)

    def __call__(self, logits: np.ndarray, history: Iterable[int]) -> int:
        logits = np.asarray(logits, dtype=np.float32)
        if logits.ndim != 1 or logits.size == 0:
            raise ValueError(f"logits must be a non-empty 1-D array, got shape {logits.shape}")
        if not np.isfinite(logits).any():
            raise RuntimeError("the model returned no finite logit")
        logits = _without_nan(logits)
        p = self.params
        if p.greedy:
            s = apply_repetition_penalty(logits, history, p.repetition_penalty)
            return int(np.argmax(s))
        s = apply_repetition_penalty(logits, history, p.repetition_penalty)
        ids, v = filter_logits(s, p)
        cdf = np.cumsum(_softmax(v).astype(np.float64))
        r = self.rng.random() * cdf[-1]
        # side="right" never lands on a zero-probability token
        return int(ids[min(np.searchsorted(cdf, r, side="right"), ids.size - 1)])
