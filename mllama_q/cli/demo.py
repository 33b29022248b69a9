"""`mllama-q demo`: the whole pipeline on an embedded default, no download needed.

    mllama-q demo [--model MODEL.gguf] [--image PATH] [--prompt TEXT] [--max-new-tokens N]
                  [--cache-dir DIR] [--threads N]
    mllama-q demo --selfcheck [...]    the kernel self-check (mllama_q.cli.selfcheck)

Default: generate (once; cached in $MLLAMA_Q_CACHE or ~/.cache/mllama-q) the tiny synthetic
model (mllama_q.cli.synthetic, random weights, real layout), load it with mllama_q.Model, run the
bundled photo through the processor and the vision tower, stream a short answer and print the
timings. With random weights the answer is gibberish: the demo shows that every stage runs,
not what the model knows. Give --model to run a real converted checkpoint instead.

The bundled photo (mllama_q/assets/demo_scene.jpg, 640x480) is drawn procedurally by
draw_demo_scene() below (a landscape with a house, a tree and the sun), so it carries no
third-party licence; llama-models' sample photos were not bundled because that package's
licence metadata only points to the Llama community licences.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from mllama_q.cli.args import check_min
from mllama_q.cli.progress import Progress

ASSETS = Path(__file__).resolve().parent.parent / "assets"  # mllama_q/assets
DEMO_IMAGE = ASSETS / "demo_scene.jpg"


def draw_demo_scene(width: int = 640, height: int = 480):
    """A deterministic 'photo': sky gradient, sun, hills, a house with a red roof, a tree."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFilter

    y = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]
    sky = (1 - y) * np.array([70, 130, 210], np.float32) + y * np.array([190, 220, 245], np.float32)
    img = Image.fromarray(np.broadcast_to(sky, (height, width, 3)).astype(np.uint8), "RGB")
    d = ImageDraw.Draw(img)
    d.ellipse([500, 40, 580, 120], fill=(255, 225, 90))  # sun
    hills = [(0, 330)] + [(x, 330 - 40 * np.sin(x / 90.0) - 20 * np.sin(x / 37.0)) for x in range(0, width + 1, 8)]
    d.polygon(hills + [(width, height), (0, height)], fill=(80, 150, 70))  # hills and meadow
    d.rectangle([170, 250, 330, 370], fill=(225, 205, 170), outline=(90, 70, 50))  # house
    d.polygon([(155, 252), (250, 180), (345, 252)], fill=(180, 50, 40))  # roof
    d.rectangle([230, 300, 270, 370], fill=(110, 70, 40))  # door
    d.rectangle([190, 270, 220, 295], fill=(150, 200, 240))  # windows
    d.rectangle([280, 270, 310, 295], fill=(150, 200, 240))
    d.rectangle([445, 260, 465, 380], fill=(100, 65, 35))  # tree trunk
    d.ellipse([395, 170, 515, 290], fill=(40, 110, 45))  # crown
    rng = np.random.default_rng(0)  # a little sensor noise and softness, like a photo
    arr = np.asarray(img.filter(ImageFilter.GaussianBlur(1.2)), dtype=np.float32)
    arr += rng.normal(0, 3.0, arr.shape)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def demo_image():
    from PIL import Image

    if DEMO_IMAGE.is_file():
        img = Image.open(DEMO_IMAGE)
        img.load()
        return img
    return draw_demo_scene()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mllama-q demo",
        description="Run the whole pipeline (synthetic tiny model + bundled photo by default) and print timings.",
    )
    p.add_argument("--selfcheck", action="store_true", help="run the kernel self-check instead")
    p.add_argument("-m", "--model", help="a GGUF file (default: the tiny synthetic model)")
    p.add_argument("-i", "--image", help="an image file (default: the bundled photo)")
    p.add_argument("-p", "--prompt", default="What is in this picture?")
    p.add_argument("-n", "--max-new-tokens", type=int, default=24)
    p.add_argument("--cache-dir", help="where the synthetic model is kept")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--selfcheck" in argv:
        from mllama_q.cli import selfcheck

        return int(selfcheck.main([a for a in argv if a != "--selfcheck"]) or 0)
    ap = _parser()
    args = ap.parse_args(argv)
    check_min(ap, "--threads", args.threads, 1)
    check_min(ap, "-n/--max-new-tokens", args.max_new_tokens, 1)
    check_min(ap, "--seed", args.seed, 0)
    try:
        return _run(args)
    except (ValueError, RuntimeError, OSError) as e:
        print(f"mllama-q demo: error: {e}", file=sys.stderr)
        return 1


def _run(args) -> int:
    from PIL import Image

    from mllama_q import Model

    timings = {}
    synthetic = args.model is None
    t0 = time.perf_counter()
    if synthetic:
        from mllama_q.cli.synthetic import cached_synthetic

        path = cached_synthetic("tiny", "q4_k_m", cache_dir=args.cache_dir, progress=False)
    else:
        path = Path(args.model)
    timings["model file"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    with Progress(f"loading {path.name}", ticker=True):
        model = Model(str(path), n_threads=args.threads)
    timings["load"] = time.perf_counter() - t0

    if args.image:
        image = Image.open(args.image)
        image.load()
        image_name = args.image
    else:
        image = demo_image()
        image_name = f"bundled photo {DEMO_IMAGE.name}"

    print(f"model : {path}" + ("  (tiny synthetic model, RANDOM weights)" if synthetic else ""))
    print(f"image : {image_name} ({image.width}x{image.height} {image.mode})")
    print(f"prompt: {args.prompt}")
    if synthetic:
        print(
            "note  : the weights are random, so the answer below is gibberish by design; the demo shows\n"
            "        that tokenizer, processor, vision tower, cross-attention decoder and sampler all run.\n"
            "        Convert a real checkpoint (mllama-q convert) and pass --model for a real answer."
        )
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": args.prompt}]}]
    print("answer: ", end="", flush=True)
    t0 = time.perf_counter()
    stream = model.generate(
        messages=messages,
        images=[image],
        max_new_tokens=args.max_new_tokens,
        temperature=0.8,
        seed=args.seed,
        stream=True,
    )
    for piece in stream:
        print(piece, end="", flush=True)
    timings["generate"] = time.perf_counter() - t0
    print()
    result = getattr(stream, "result", None)
    print("timings:")
    for k, v in timings.items():
        print(f"  {k:<22} {v * 1e3:9.1f} ms")
    extra = getattr(result, "timings", None) if result is not None else None
    if isinstance(extra, dict):  # GenerationResult.timings: *_s seconds, *_per_s rates
        for k, v in extra.items():
            if not isinstance(v, (int, float)) or k == "load_s":  # load is printed above
                continue
            if k.endswith("_per_s"):
                print(f"  {k[:-6]:<22} {v:9.1f} tok/s")
            elif k.endswith("_s"):
                print(f"  {k[:-2]:<22} {v * 1e3:9.1f} ms")
    if result is not None:
        print(
            f"tokens: {result.prompt_tokens} prompt, {result.completion_tokens} generated (stop: {result.stop_reason})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
