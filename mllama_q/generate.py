"""Text generation on top of the model's low-level API (pure Python + numpy).

The model object (mllama_q.model.Model, or a fake in tests) provides:

    model.tokenizer, model.processor          mllama_q.tokenizer.Tokenizer / mllama_q.processor.Processor
    model.stop_ids: list[int]                 every id that ends a turn (eos, eot, eom, ...)
    model.n_ctx: int; model.n_past: int       context size; tokens in the KV cache
    model.reset()                             empty the KV cache (and the cached image K/V)
    model.encode_images(pixel_values, aspect_ratio_ids, aspect_ratio_mask)
                                              vision tower + cross-attention K/V for these images
    model.eval(tokens int32 [n], cross_attention_mask int64 [n, n_images, max_tiles] | None)
                                              -> float32 logits [vocab] of the last token
    model.generation_defaults (optional)      {"temperature": .., "top_p": .., "top_k": ..}

Cross-attention mask of generated tokens: HF's MllamaForConditionalGeneration
(`_update_model_kwargs_for_generation`) appends, for every new token, a copy of the LAST row
of the prompt's mask. So a new token sees exactly the images the last prompt token saw.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from .sampling import DEFAULT_TEMPERATURE, DEFAULT_TOP_P, Sampler, SamplingParams, _is_int


@dataclass
class GenerationResult:
    text: str
    tokens: list[int]                 # generated ids (the stop token excluded)
    prompt_tokens: int
    completion_tokens: int
    stop_reason: str                  # "stop_token" | "stop_string" | "length"
    timings: dict[str, float] = field(default_factory=dict)
    # image_encode_s, prefill_s, decode_s, total_s, prefill_tokens_per_s, decode_tokens_per_s,
    # time_to_first_token_s


class GenerationStream:
    """Iterate to get text pieces as they are generated; `.result` is set when done."""

    def __init__(self, gen: Iterator[str]):
        self._gen = gen
        self.result: GenerationResult | None = None

    def __iter__(self):
        return self

    def __next__(self) -> str:
        try:
            return next(self._gen)
        except StopIteration as stop:
            self.result = stop.value
            raise StopIteration from None

    def close(self):
        self._gen.close()


@dataclass
class Prompt:
    """A tokenised prompt ready for the model (batch dimension dropped)."""

    input_ids: np.ndarray                         # int32 [L]
    cross_attention_mask: np.ndarray | None       # int64 [L, n_images, max_tiles]
    pixel_values: np.ndarray | None               # float32 [1, n_images, max_tiles, 3, T, T]
    aspect_ratio_ids: np.ndarray | None           # int64 [1, n_images]
    aspect_ratio_mask: np.ndarray | None          # int64 [1, n_images, max_tiles]
    text: str


def prompt_text(model, messages: Sequence[Mapping] | None = None, prompt: str | None = None,
                add_generation_prompt: bool = True, chat_kwargs: Mapping[str, Any] | None = None) -> tuple[str, bool]:
    """(text, add_special_tokens) the processor tokenises: messages rendered with the GGUF's chat
    template (which writes BOS itself: False), or a raw prompt as given (True: MllamaProcessor's
    BOS rules apply). Images are not looked at, so this is cheap (the server counts prompt tokens
    with it before choosing a slot)."""
    if (messages is None) == (prompt is None):
        raise ValueError("give exactly one of messages= or prompt=")
    if messages is not None:
        from .chat import ChatTemplate

        template = getattr(model, "chat_template", None)
        if template is None:
            template = ChatTemplate(model.tokenizer.chat_template, model.tokenizer)
        return template.render(messages, add_generation_prompt=add_generation_prompt, **dict(chat_kwargs or {})), False
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be a string, got {type(prompt).__name__}")
    return prompt, True


def build_prompt(model, messages: Sequence[Mapping] | None = None, prompt: str | None = None,
                 images: Sequence | None = None, add_generation_prompt: bool = True,
                 chat_kwargs: Mapping[str, Any] | None = None) -> Prompt:
    """messages (rendered with the GGUF's chat template, no extra BOS) or a raw prompt
    (MllamaProcessor's rules: BOS text added unless present, tokenizer adds its BOS)."""
    if messages is not None and images is None:
        from .chat import message_images

        embedded = message_images(messages)
        if any(img is not None for img in embedded):
            if any(img is None for img in embedded):
                raise ValueError("some image items carry an image and some do not; pass images= instead")
            images = embedded
    proc = model.processor
    text, add_special = prompt_text(model, messages=messages, prompt=prompt,
                                    add_generation_prompt=add_generation_prompt, chat_kwargs=chat_kwargs)
    images = list(images) if images is not None else []
    image_token = proc.settings.image_token
    if text.count(image_token) != len(images):
        raise ValueError(f"the prompt has {text.count(image_token)} {image_token} token(s) but "
                         f"{len(images)} image(s) were given")
    enc = proc(text=text, images=images or None, add_special_tokens=add_special)
    ids = enc["input_ids"][0].astype(np.int32)
    cam = enc.get("cross_attention_mask")
    return Prompt(
        input_ids=ids,
        cross_attention_mask=None if cam is None else cam[0],
        pixel_values=enc.get("pixel_values"),
        aspect_ratio_ids=enc.get("aspect_ratio_ids"),
        aspect_ratio_mask=enc.get("aspect_ratio_mask"),
        text=text,
    )


def generation_defaults_from_gguf(reader) -> dict:
    """{"temperature", "top_p", "top_k"} from the GGUF's general.sampling.* keys (the converter
    copies generation_config.json there); absent keys give Llama 3.2 Vision Instruct's values."""
    from . import gguf_keys as K
    from .gguf_file import get_float, get_int

    return {"temperature": get_float(reader, K.GENERAL_SAMPLING_TEMP, DEFAULT_TEMPERATURE),
            "top_p": get_float(reader, K.GENERAL_SAMPLING_TOP_P, DEFAULT_TOP_P),
            "top_k": get_int(reader, K.GENERAL_SAMPLING_TOP_K, 0)}


def stop_ids_from_gguf(reader, tokenizer=None) -> list[int]:
    """Every id that ends generation: mllama_q.stop_token_ids (generation_config's eos list),
    plus the tokenizer's eos / eot / eom ids; Llama 3's [128001, 128008, 128009] if none is known."""
    from . import gguf_keys as K
    from .gguf_file import get_int_list

    ids = get_int_list(reader, K.Q_STOP_TOKEN_IDS, [])
    if tokenizer is not None:
        ids += [i for i in (tokenizer.eos_id, tokenizer.eot_id, tokenizer.eom_id) if i is not None]
    return sorted(set(ids)) or [128001, 128008, 128009]


def _defaults(model) -> dict:
    """model.generation_defaults if the model has it, else read from its GGUF reader (model._reader)."""
    d = {"temperature": DEFAULT_TEMPERATURE, "top_p": DEFAULT_TOP_P, "top_k": 0}
    given = getattr(model, "generation_defaults", None)
    if given is None and getattr(model, "_reader", None) is not None:
        given = generation_defaults_from_gguf(model._reader)
        try:
            model.generation_defaults = given  # read the file once
        except AttributeError:
            pass
    d.update({k: v for k, v in (given or {}).items() if v is not None})
    return d


def _stop_strings(stop) -> list[str]:
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    out = list(stop)
    for s in out:
        if not isinstance(s, str) or not s:
            raise ValueError(f"stop strings must be non-empty strings, got {s!r}")
    return out


def generate(model, messages: Sequence[Mapping] | None = None, prompt: str | None = None,
             images: Sequence | None = None, max_new_tokens: int = 512, temperature: float | None = None,
             top_k: int | None = None, top_p: float | None = None, min_p: float = 0.0,
             repetition_penalty: float = 1.0, seed: int | None = None, stop: Sequence[str] | str | None = None,
             stream: bool = False, add_generation_prompt: bool = True,
             chat_kwargs: Mapping[str, Any] | None = None):
    """Generate a reply. Returns a GenerationResult, or with stream=True a GenerationStream that
    yields text pieces (valid UTF-8 strings) and holds the GenerationResult in `.result` at the end.

    Sampling defaults (temperature, top_p, top_k) come from the GGUF's generation config
    (model.generation_defaults; Llama 3.2 Vision Instruct: 0.6 / 0.9 / off). temperature=0 is greedy.
    Generation stops at any of model.stop_ids, at any `stop` string (cut from the text), after
    max_new_tokens, or when the context (model.n_ctx) is full.
    """
    d = _defaults(model)
    params = SamplingParams(
        temperature=d["temperature"] if temperature is None else temperature,
        top_k=d["top_k"] if top_k is None else top_k,
        top_p=d["top_p"] if top_p is None else top_p,
        min_p=min_p, repetition_penalty=repetition_penalty, seed=seed)
    if not _is_int(max_new_tokens) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    stops = _stop_strings(stop)

    t_start = time.perf_counter()
    p = build_prompt(model, messages=messages, prompt=prompt, images=images,
                     add_generation_prompt=add_generation_prompt, chat_kwargs=chat_kwargs)
    n_prompt = int(p.input_ids.size)
    if n_prompt >= model.n_ctx:
        raise ValueError(f"prompt is {n_prompt} tokens, the context holds {model.n_ctx} "
                         "(at least one more position is needed to generate)")
    gen = _run(model, p, params, max_new_tokens, stops, t_start)
    if stream:
        return GenerationStream(gen)
    while True:
        try:
            next(gen)
        except StopIteration as done:
            return done.value


def _held_back(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of a stop string (this text
    must not be shown yet: the next tokens may complete the stop string)."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


def _run(model, p: Prompt, params: SamplingParams, max_new_tokens: int, stops: list[str], t_start: float):
    tok = model.tokenizer
    stop_ids = set(int(i) for i in model.stop_ids)
    sampler = Sampler(params)
    timings: dict[str, float] = {}

    model.reset()
    n_images = 0 if p.pixel_values is None else int(p.pixel_values.shape[1])
    t0 = time.perf_counter()
    if n_images:
        model.encode_images(p.pixel_values, p.aspect_ratio_ids, p.aspect_ratio_mask)
    t1 = time.perf_counter()
    timings["image_encode_s"] = t1 - t0
    logits = model.eval(p.input_ids, p.cross_attention_mask)
    t2 = time.perf_counter()
    timings["prefill_s"] = t2 - t1
    timings["prefill_tokens_per_s"] = p.input_ids.size / max(t2 - t1, 1e-9)
    # every generated token sees what the last prompt token saw (HF: last mask row repeated)
    step_mask = None if p.cross_attention_mask is None else p.cross_attention_mask[-1:].copy()

    history = p.input_ids.astype(np.int64).tolist()
    generated: list[int] = []
    decoder = tok.stream_decoder(skip_special_tokens=True)
    text = ""          # everything decoded so far
    emitted = 0        # how much of `text` was yielded
    stop_reason = "length"
    t_first = None
    n_decode_evals = 0
    t_dec0 = time.perf_counter()
    while True:
        next_id = sampler(logits, history)
        if t_first is None:
            t_first = time.perf_counter()
        if next_id in stop_ids:
            stop_reason = "stop_token"
            break
        generated.append(next_id)
        history.append(next_id)
        text += decoder.push(next_id)
        if stops:
            hit = min((i for i in (text.find(s, max(0, emitted - len(s))) for s in stops) if i >= 0), default=-1)
            if hit >= 0:
                text = text[:hit]
                if hit > emitted:
                    yield text[emitted:hit]
                emitted = hit
                stop_reason = "stop_string"
                break
            safe = len(text) - _held_back(text, stops)
        else:
            safe = len(text)
        if safe > emitted:
            yield text[emitted:safe]
            emitted = safe
        if len(generated) >= max_new_tokens or model.n_past >= model.n_ctx:
            stop_reason = "length"
            break
        logits = model.eval(np.asarray([next_id], dtype=np.int32), step_mask)
        n_decode_evals += 1
    if stop_reason != "stop_string":
        text += decoder.flush()
        if len(text) > emitted:
            yield text[emitted:]
    t_end = time.perf_counter()
    timings["decode_s"] = t_end - t_dec0
    timings["decode_tokens_per_s"] = n_decode_evals / max(t_end - t_dec0, 1e-9) if n_decode_evals else 0.0
    timings["time_to_first_token_s"] = (t_first or t_end) - t_start
    timings["total_s"] = t_end - t_start
    if getattr(model, "load_time_s", None) is not None:  # set by Model if it measures its load
        timings["load_s"] = float(model.load_time_s)
    return GenerationResult(text=text, tokens=generated, prompt_tokens=int(p.input_ids.size),
                            completion_tokens=len(generated), stop_reason=stop_reason, timings=timings)
