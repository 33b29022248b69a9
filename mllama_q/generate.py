"""Text generation: requests in transformers' vocabulary, the text side of a reply (streaming
UTF-8, stop strings) and the one-sequence loop over a model's low-level API.

`Model.generate` and `Session.generate` (mllama_q/session.py: sessions batched by one
scheduler) take the arguments documented in GENERATE_DOC; `prepare_request` checks them and
builds the prompt in the caller's thread. `generate(model, ...)` runs one request on any
object with the low-level API below (a real Model delegates to its own generate; tests use
fakes):

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

STOP_REASONS = ("stop_token", "stop_string", "length", "context_full", "cancelled")


@dataclass
class GenerationResult:
    text: str
    tokens: list[int]  # generated ids (the stop token excluded)
    prompt_tokens: int
    completion_tokens: int
    stop_reason: str  # one of STOP_REASONS
    timings: dict[str, float] = field(default_factory=dict)
    # load_s, prepare_s (the caller's thread: image decode and resize, chat template,
    # tokenizer), queue_s (sessions: waiting for the engine), image_encode_s, prefill_s,
    # decode_s, total_s, prefill_tokens_per_s, decode_tokens_per_s, time_to_first_token_s
    cached_tokens: int = 0  # prompt tokens reused from the session's KV cache
    images_encoded: int = 0  # images of the prompt that ran through the vision tower
    images_cached: int = 0  # images whose cross-attention K/V were reused


class GenerationStream:
    """Iterate to get text pieces as they are generated; `.result` is set when done.

    close() stops the generation (the sequence leaves the batch at the next step) and sets
    `.result` (stop_reason "cancelled" unless it had already finished)."""

    def __init__(self, gen: Iterator[str], on_close=None):
        self._gen = gen
        self._on_close = on_close
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
        """Stop generating; waits (at most one step) until the session is consistent again."""
        on_close, self._on_close = self._on_close, None
        if on_close is not None:
            res = on_close(True)
            if self.result is None:
                self.result = res
        self._gen.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        # An abandoned stream: cancel without waiting (this may run in any thread).
        on_close, self._on_close = getattr(self, "_on_close", None), None
        if on_close is not None:
            try:
                on_close(False)
            except Exception:
                pass


@dataclass
class Prompt:
    """A tokenised prompt ready for the model (batch dimension dropped)."""

    input_ids: np.ndarray  # int32 [L]
    cross_attention_mask: np.ndarray | None  # int64 [L, n_images, max_tiles]
    pixel_values: np.ndarray | None  # float32 [1, n_images, max_tiles, 3, T, T]
    aspect_ratio_ids: np.ndarray | None  # int64 [1, n_images]
    aspect_ratio_mask: np.ndarray | None  # int64 [1, n_images, max_tiles]
    text: str


def prompt_text(
    model,
    messages: Sequence[Mapping] | None = None,
    prompt: str | None = None,
    add_generation_prompt: bool = True,
    chat_kwargs: Mapping[str, Any] | None = None,
) -> tuple[str, bool]:
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


def build_prompt(
    model,
    messages: Sequence[Mapping] | None = None,
    prompt: str | None = None,
    images: Sequence | None = None,
    add_generation_prompt: bool = True,
    chat_kwargs: Mapping[str, Any] | None = None,
) -> Prompt:
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
    text, add_special = prompt_text(
        model, messages=messages, prompt=prompt, add_generation_prompt=add_generation_prompt, chat_kwargs=chat_kwargs
    )
    images = list(images) if images is not None else []
    image_token = proc.settings.image_token
    if text.count(image_token) != len(images):
        raise ValueError(
            f"the prompt has {text.count(image_token)} {image_token} token(s) but {len(images)} image(s) were given"
        )
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

    return {
        "temperature": get_float(reader, K.GENERAL_SAMPLING_TEMP, DEFAULT_TEMPERATURE),
        "top_p": get_float(reader, K.GENERAL_SAMPLING_TOP_P, DEFAULT_TOP_P),
        "top_k": get_int(reader, K.GENERAL_SAMPLING_TOP_K, 0),
    }


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
    if not isinstance(stop, (list, tuple)):
        raise ValueError(f"stop must be a string or a list of strings, got {type(stop).__name__}")
    out = list(stop)
    for s in out:
        if not isinstance(s, str) or not s:
            raise ValueError(f"stop strings must be non-empty strings, got {s!r}")
    return out


GENERATE_DOC = """Generate a reply.

Give the input one of three ways (transformers' vocabulary throughout):
  * messages=[{"role": ..., "content": ...}, ...]  rendered with the GGUF's chat template
    (images as {"type": "image"} items, the image objects in `images=` or in the items);
  * prompt="..."                  raw text (MllamaProcessor's rules; put <|image|> tokens in it);
  * **model.processor(text=..., images=...)  the arrays as transformers users pass them:
    input_ids, attention_mask, pixel_values, aspect_ratio_ids, aspect_ratio_mask,
    cross_attention_mask (batch 1; attention_mask must be all ones: no padding).

Options, with the names llama.cpp's server / Ollama's API use for the same thing:
  max_new_tokens=512      at most this many new tokens        llama.cpp n_predict, Ollama num_predict
  do_sample=None          False: greedy (argmax); None: the model's generation config
  temperature=None        0 = greedy; None: the GGUF's generation config (0.6 for
                          Llama 3.2 Vision Instruct)          temperature / temperature
  top_k=None              0 = off; None: the config's (off)   top_k / top_k
  top_p=None              1 = off; None: the config's (0.9)   top_p / top_p
  min_p=0.0               0 = off                              min_p / min_p
  repetition_penalty=1.0  1 = off; transformers' rule: every token of the sequence (prompt
                          included) once                       repeat_penalty / repeat_penalty
                          (those apply it to the last repeat_last_n = 64 tokens only)
  seed=None               the sampler's random seed (None: random)   seed / seed
  stop_strings=None       a string or a list: generation stops when one appears (it is cut
                          from the text; None: model.generation_defaults["stop"] if set, an
                          Ollama params layer's)              stop / stop  (`stop=` is accepted
                          as an alias: the name llama.cpp, Ollama and OpenAI use)
  stream=False            True: a GenerationStream that yields text pieces   stream / stream
  add_generation_prompt=True, chat_kwargs=None   passed to the chat template
  progress=None           callable(phase, done, total) for long phases: "image_encode" (per
                          vision layer) and "prefill" (per chunk); called in the caller's thread
The context length is the Model's n_ctx (llama.cpp -c / n_ctx, Ollama num_ctx).

Returns a GenerationResult (text, tokens, counts, stop_reason in "stop_token", "stop_string",
"length", "context_full", "cancelled", timings, cached_tokens, images_encoded, images_cached),
or with stream=True a GenerationStream (.result at the end; .close() cancels). Generation
stops at any of model.stop_ids, at a stop string, after max_new_tokens ("length") or when the
context is full ("context_full"). Ctrl-C (KeyboardInterrupt) during an image encode or the
prefill stops it promptly; the session is left as it was before the call.
"""


@dataclass
class Request:
    """One generation request, checked and tokenised (in the caller's thread)."""

    prompt: Prompt
    params: SamplingParams
    max_new_tokens: int
    stops: list[str]
    progress: Any = None
    t_start: float = 0.0  # perf_counter() when the call began
    t_ready: float = 0.0  # ... and when the prompt was built (images decoded and resized, tokenised)


def _array(a, name: str, ndim: int, dtype) -> np.ndarray:
    """An input array with a leading batch of 1 dropped, checked to have `ndim` dimensions."""
    x = np.asarray(a)
    if x.ndim == ndim + 1:
        if x.shape[0] != 1:
            raise ValueError(f"{name}: only one sequence (batch 1) per call is supported, got batch {x.shape[0]}")
        x = x[0]
    if x.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions (plus an optional batch of 1), got shape {x.shape}")
    if np.issubdtype(dtype, np.integer) and x.size:
        if not np.issubdtype(x.dtype, np.integer):
            raise ValueError(f"{name} must hold integers, got dtype {x.dtype}")
        # checked before narrowing: an int64 2**32 + 5 cast to int32 would be a silent 5
        info = np.iinfo(dtype)
        lo, hi = int(x.min()), int(x.max())
        if lo < info.min or hi > info.max:
            raise ValueError(f"{name} values out of range: {lo if lo < info.min else hi} does not fit {info.dtype}")
    return np.ascontiguousarray(x, dtype=dtype)


def prompt_from_arrays(
    model,
    input_ids,
    attention_mask=None,
    pixel_values=None,
    aspect_ratio_ids=None,
    aspect_ratio_mask=None,
    cross_attention_mask=None,
) -> Prompt:
    """A Prompt from MllamaProcessor-style arrays (what `model.processor(...)` returns)."""
    ids = _array(input_ids, "input_ids", 1, np.int32)
    if ids.size == 0:
        raise ValueError("input_ids is empty")
    limit = int(getattr(model, "text_hparams", {}).get("vocab_size", 1 << 30)) + 8
    if ids.min() < 0 or ids.max() >= limit:
        raise ValueError(f"input_ids must be token ids in [0, {limit})")
    if attention_mask is not None:
        am = _array(attention_mask, "attention_mask", 1, np.int64)
        if am.shape != ids.shape or not np.all(am == 1):
            raise ValueError("attention_mask must be all ones (one unpadded sequence)")
    n_img = 0
    if pixel_values is not None:
        if aspect_ratio_ids is None or aspect_ratio_mask is None:
            raise ValueError("pixel_values needs aspect_ratio_ids and aspect_ratio_mask")
        px = np.asarray(pixel_values)
        if px.ndim == 5:
            px = px[None]
        if px.ndim != 6 or px.shape[0] != 1:
            raise ValueError(f"pixel_values must be [1, n_images, max_tiles, C, H, W], got shape {px.shape}")
        pixel_values = np.ascontiguousarray(px, dtype=np.float32)
        n_img = px.shape[1]
        aspect_ratio_ids = _array(aspect_ratio_ids, "aspect_ratio_ids", 1, np.int64)[None]
        aspect_ratio_mask = _array(aspect_ratio_mask, "aspect_ratio_mask", 2, np.int64)[None]
        if aspect_ratio_ids.shape[1] != n_img or aspect_ratio_mask.shape[1:] != px.shape[1:3]:
            raise ValueError("aspect_ratio_ids must be [1, n_images] and aspect_ratio_mask [1, n_images, max_tiles]")
    elif aspect_ratio_ids is not None or aspect_ratio_mask is not None or cross_attention_mask is not None:
        raise ValueError("aspect_ratio_ids, aspect_ratio_mask and cross_attention_mask need pixel_values")
    cam = None
    if cross_attention_mask is not None:
        cam = _array(cross_attention_mask, "cross_attention_mask", 3, np.int64)
        if cam.shape != (ids.size, n_img, pixel_values.shape[2]):
            raise ValueError(
                f"cross_attention_mask must be [n_tokens, n_images, max_tiles] = "
                f"[{ids.size}, {n_img}, {pixel_values.shape[2]}], got {list(cam.shape)}"
            )
    image_id = getattr(model, "image_token_id", None)
    if image_id is not None and n_img and int(np.sum(ids == image_id)) != n_img:
        raise ValueError(f"input_ids hold {int(np.sum(ids == image_id))} image token(s) for {n_img} image(s)")
    return Prompt(
        input_ids=ids,
        cross_attention_mask=cam,
        pixel_values=pixel_values,
        aspect_ratio_ids=aspect_ratio_ids,
        aspect_ratio_mask=aspect_ratio_mask,
        text="",
    )


def prepare_request(
    model,
    messages=None,
    prompt=None,
    images=None,
    *,
    input_ids=None,
    attention_mask=None,
    pixel_values=None,
    aspect_ratio_ids=None,
    aspect_ratio_mask=None,
    cross_attention_mask=None,
    max_new_tokens=512,
    do_sample=None,
    temperature=None,
    top_k=None,
    top_p=None,
    min_p=0.0,
    repetition_penalty=1.0,
    seed=None,
    stop_strings=None,
    stop=None,
    add_generation_prompt=True,
    chat_kwargs=None,
    progress=None,
) -> Request:
    """Checks every argument (ValueError naming the bad one) and builds the prompt."""
    t_start = time.perf_counter()
    d = _defaults(model)
    if do_sample not in (None, True, False):
        raise ValueError(f"do_sample must be True, False or None, got {do_sample!r}")
    if temperature is None:
        temperature = 0.0 if do_sample is False else d["temperature"]
    elif do_sample is False:
        temperature = 0.0
    params = SamplingParams(
        temperature=temperature,
        top_k=d["top_k"] if top_k is None else top_k,
        top_p=d["top_p"] if top_p is None else top_p,
        min_p=min_p,
        repetition_penalty=repetition_penalty,
        seed=seed,
    )
    if not _is_int(max_new_tokens) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if stop_strings is not None and stop is not None:
        raise ValueError("give stop_strings= or its alias stop=, not both")
    given = stop_strings if stop_strings is not None else stop
    stops = _stop_strings(d.get("stop") if given is None else given)  # default: the model's (an Ollama params layer)
    if progress is not None and not callable(progress):
        raise ValueError("progress must be a callable(phase, done, total)")
    if input_ids is not None:
        if messages is not None or prompt is not None or images is not None:
            raise ValueError("give input_ids (processor outputs) or messages= / prompt=, not both")
        p = prompt_from_arrays(
            model, input_ids, attention_mask, pixel_values, aspect_ratio_ids, aspect_ratio_mask, cross_attention_mask
        )
    else:
        if any(
            a is not None
            for a in (attention_mask, pixel_values, aspect_ratio_ids, aspect_ratio_mask, cross_attention_mask)
        ):
            raise ValueError("processor arrays (pixel_values, ...) need input_ids")
        p = build_prompt(
            model,
            messages=messages,
            prompt=prompt,
            images=images,
            add_generation_prompt=add_generation_prompt,
            chat_kwargs=chat_kwargs,
        )
    n_prompt = int(p.input_ids.size)
    if n_prompt >= model.n_ctx:
        raise ValueError(
            f"prompt is {n_prompt} tokens, the context holds {model.n_ctx} "
            "(at least one more position is needed to generate)"
        )
    return Request(
        prompt=p,
        params=params,
        max_new_tokens=int(max_new_tokens),
        stops=stops,
        progress=progress,
        t_start=t_start,
        t_ready=time.perf_counter(),
    )


class TextOut:
    """Generated ids -> text pieces: streaming UTF-8 (a character split over tokens comes out
    whole), stop strings cut from the text and never shown, not even in part (a suffix that
    may start a stop string is held back until the next token decides)."""

    def __init__(self, tokenizer, stops: list[str]):
        self.decoder = tokenizer.stream_decoder(skip_special_tokens=True)
        self.stops = stops
        self.text = ""  # everything decoded so far (cut at a stop string once hit)
        self.emitted = 0  # how much of `text` was handed out
        self.stopped = False

    def push(self, token_id: int) -> str:
        """The new piece of text that can be shown after this token ("" if none)."""
        self.text += self.decoder.push(token_id)
        if self.stops:
            e = self.emitted
            hit = min((i for i in (self.text.find(s, max(0, e - len(s))) for s in self.stops) if i >= 0), default=-1)
            if hit >= 0:
                self.text = self.text[:hit]
                self.stopped = True
                self.emitted = max(e, hit)
                return self.text[e:hit] if hit > e else ""
            safe = len(self.text) - _held_back(self.text, self.stops)
        else:
            safe = len(self.text)
        if safe > self.emitted:
            piece = self.text[self.emitted : safe]
            self.emitted = safe
            return piece
        return ""

    def finish(self) -> str:
        """The rest of the text at the end of generation (held-back text, a final partial character)."""
        if not self.stopped:
            self.text += self.decoder.flush()
        piece = self.text[self.emitted :]
        self.emitted = len(self.text)
        return piece


def generate(
    model,
    messages: Sequence[Mapping] | None = None,
    prompt: str | None = None,
    images: Sequence | None = None,
    **kwargs,
):
    if hasattr(model, "_scheduler"):
        return model.generate(messages=messages, prompt=prompt, images=images, **kwargs)
    stream = kwargs.pop("stream", False)
    req = prepare_request(model, messages=messages, prompt=prompt, images=images, **kwargs)
    gen = _run(model, req)
    if stream:
        return GenerationStream(gen)
    while True:
        try:
            next(gen)
        except StopIteration as done:
            return done.value


generate.__doc__ = (
    "Generate with any model object: a Model (its scheduler: Model.generate), or anything with "
    "the low-level API of this module's docstring (one sequence, step by step).\n\n" + GENERATE_DOC
)


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


def _run(model, req: Request):
    """One sequence over the low-level API: reset, images, prefill, then one eval per token."""
    p, params = req.prompt, req.params
    stop_ids = set(int(i) for i in model.stop_ids)
    sampler = Sampler(params)
    timings: dict[str, float] = {"prepare_s": req.t_ready - req.t_start}

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
    out = TextOut(model.tokenizer, req.stops)
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
        piece = out.push(next_id)
        if piece:
            yield piece
        if out.stopped:
            stop_reason = "stop_string"
            break
        if len(generated) >= req.max_new_tokens:
            stop_reason = "length"
            break
        if model.n_past >= model.n_ctx:
            stop_reason = "context_full"
            break
        logits = model.eval(np.asarray([next_id], dtype=np.int32), step_mask)
        n_decode_evals += 1
    piece = out.finish()
    if piece:
        yield piece
    t_end = time.perf_counter()
    timings["decode_s"] = t_end - t_dec0
    timings["decode_tokens_per_s"] = n_decode_evals / max(t_end - t_dec0, 1e-9) if n_decode_evals else 0.0
    timings["time_to_first_token_s"] = (t_first or t_end) - req.t_start
    timings["total_s"] = t_end - req.t_start
    if getattr(model, "load_time_s", None) is not None:  # set by Model if it measures its load
        timings["load_s"] = float(model.load_time_s)
    return GenerationResult(
        text=out.text,
        tokens=generated,
        prompt_tokens=int(p.input_ids.size),
        completion_tokens=len(generated),
        stop_reason=stop_reason,
        timings=timings,
        images_encoded=n_images,
    )
