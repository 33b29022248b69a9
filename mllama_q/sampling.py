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
Everything runs in float32 like HF's scores; filtered tokens get -inf.
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
        if not _is_num(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 disables it), got {self.top_k!r}")
        if not _is_num(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not _is_num(self.min_p) or not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p!r}")
        if not _is_num(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be a finite number > 0, got {self.repetition_penalty!r}")
        if self.seed is not None and (not _is_int(self.seed) or self.seed < 0):
            raise ValueError(f"seed must be an integer >= 0 or None, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def apply_repetition_penalty(scores: np.ndarray, history: Iterable[int], penalty: float) -> np.ndarray:
    """scores float32 [V]; every id seen in `history` is penalised once (HF gathers unique ids)."""
    if penalty == 1.0:
        return scores
    ids = np.unique(np.fromiter(history, dtype=np.int64))
    if ids.size == 0:
        return scores
    out = scores.copy()
    s = out[ids]
    out[ids] = np.where(s < 0, s * np.float32(penalty), s / np.float32(penalty))
    return out


def filter_logits(scores: np.ndarray, params: SamplingParams) -> np.ndarray:
    """Temperature, top-k, top-p, min-p on float32 scores [V] (repetition penalty already applied).
    Returns float32 [V] with -inf for removed tokens."""
    x = scores.astype(np.float32, copy=True)
    if params.temperature != 1.0:
        x = x / np.float32(params.temperature)
    if params.top_k > 0 and params.top_k < x.size:
        kth = np.partition(x, x.size - params.top_k)[x.size - params.top_k]
        x[x < kth] = -np.inf
    if params.top_p < 1.0:
        order = np.argsort(x, kind="stable")  # ascending, like HF's sort(descending=False)
        sx = x[order]
        cum = np.cumsum(_softmax(sx))
        remove = cum <= np.float32(1.0 - params.top_p)
        remove[-1] = False  # min_tokens_to_keep = 1
        x[order[remove]] = -np.inf
    if params.min_p > 0.0:
        p = _softmax(x)
        remove = p < np.float32(params.min_p) * p.max()
        remove[int(np.argmax(p))] = False
        x[remove] = -np.inf
    return x


def _softmax(x: np.ndarray) -> np.ndarray:
    """float32 softmax; -inf entries give exactly 0."""
    m = np.max(x)
    e = np.exp(x - m, dtype=np.float32)
    return e / e.sum(dtype=np.float32)


def probabilities(scores: np.ndarray, history: Iterable[int], params: SamplingParams) -> np.ndarray:
    """The sampling distribution float32 [V] for these logits (what multinomial draws from)."""
    s = apply_repetition_penalty(np.asarray(scores, dtype=np.float32), history, params.repetition_penalty)
    return _softmax(filter_logits(s, params))


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
        p = self.params
        if p.greedy:
            s = apply_repetition_penalty(logits, history, p.repetition_penalty)
            return int(np.argmax(s))
        probs = probabilities(logits, history, p).astype(np.float64)
        cdf = np.cumsum(probs)
        r = self.rng.random() * cdf[-1]
        # side="right" never lands on a zero-probability token
        return int(min(np.searchsorted(cdf, r, side="right"), probs.size - 1))
