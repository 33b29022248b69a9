"""Images from requests: inline base64 only, decoded under explicit limits.

Two wire forms reach the server:
- OpenAI content parts `{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}`
  (a data URL, RFC 2397). An http(s) URL is refused with a clear message: the server never
  reaches the network (no fetching on a client's behalf, no server-side request forgery);
  any other scheme (file:, ...) is refused too, so a request can never make it open a path.
- Ollama `images: ["<base64>", ...]` (api/types.go ImageData is []byte, which Go's JSON
  carries as standard base64).

Decoding is bounded before any pixel buffer is allocated: the encoded size per image, then the
pixel count from the image header (PIL reads only the header at open), then the decode itself.
Only raster formats PIL decodes in-process are tried (`formats=`): EPS, for one, would run
Ghostscript. Truncated or corrupt files, decompression bombs (a tiny file declaring a huge
canvas) and animations (first frame used) are handled; every failure is an APIError(400).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import warnings
from dataclasses import dataclass

from .errors import APIError, bad_request

# PIL plugins tried on request images (JPEG also opens MPO, the multi-picture JPEG phones write).
FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")


@dataclass(frozen=True)
class ImageLimits:
    max_images: int = 4  # per request, counting every message (history included)
    max_bytes: int = 20 * 1024 * 1024  # encoded size of one image
    max_pixels: int = 40_000_000  # width x height of one image


@dataclass
class RequestImage:
    """A checked image: its encoded bytes (decoded once to check them, then dropped, so a queued
    request holds no pixel buffers) and what identifies it."""

    data: bytes
    digest: str  # sha256 of the encoded bytes: identifies the image for slot choice
    width: int
    height: int

    def open(self):
        """The decoded image (PIL, first frame), for the generation thread."""
        return _decode(self.data)


def check_image_count(n: int, limits: ImageLimits, param: str) -> None:
    """Before decoding anything: at most limits.max_images per request, history included."""
    if n > limits.max_images:
        raise bad_request(
            f"too many images: {n} in the request, at most {limits.max_images} per request, "
            "history included (--max-images)",
            param=param,
        )


def image_from_url(url, where: str, limits: ImageLimits) -> RequestImage:
    """An OpenAI `image_url.url`: a base64 data URL."""
    if not isinstance(url, str) or not url:
        raise bad_request(f"'{where}' must be a non-empty string", param=where)
    head = url[:16].lower()
    if head.startswith(("http://", "https://")):
        raise bad_request(
            f"'{where}': image URLs are not fetched (this server never reaches the network); "
            "send the image inline as a data URL: data:image/png;base64,...",
            param=where,
            code="image_url_not_supported",
        )
    if not head.startswith("data:"):
        scheme = url.split(":", 1)[0][:20] if ":" in url else url[:20]
        raise bad_request(
            f"'{where}': unsupported image URL {scheme!r}...; send the image inline as a "
            "data URL: data:image/png;base64,...",
            param=where,
        )
    meta, sep, payload = url[5:].partition(",")
    if not sep:
        raise bad_request(f"'{where}': malformed data URL (no ',' after the media type)", param=where)
    parts = [p.strip().lower() for p in meta.split(";")]
    if "base64" not in parts[1:]:
        raise bad_request(f"'{where}': only base64 data URLs are supported (data:image/...;base64,...)", param=where)
    if parts[0] and not parts[0].startswith("image/"):
        raise bad_request(f"'{where}': the data URL's media type is {parts[0]!r}, not an image", param=where)
    return decode_image(_b64decode(payload, where, limits), where, limits)


def image_from_base64(data, where: str, limits: ImageLimits) -> RequestImage:
    """An Ollama `images[i]`: base64 of the file (a data URL is accepted too)."""
    if not isinstance(data, str) or not data:
        raise bad_request(f"'{where}' must be a non-empty base64 string", param=where)
    if data[:5].lower() == "data:":
        return image_from_url(data, where, limits)
    return decode_image(_b64decode(data, where, limits), where, limits)


def _b64decode(s: str, where: str, limits: ImageLimits) -> bytes:
    s = "".join(s.split())  # base64 may be wrapped (MIME): whitespace is not data
    if len(s) // 4 * 3 > limits.max_bytes:
        raise bad_request(
            f"'{where}': the image is about {len(s) // 4 * 3 / 2**20:.1f} MiB, more than the "
            f"{limits.max_bytes / 2**20:.1f} MiB limit per image (--max-image-mb)",
            param=where,
        )
    s += "=" * (-len(s) % 4)  # tolerate missing padding
    try:
        return base64.b64decode(s, validate=True)
    except (binascii.Error, ValueError):
        try:
            return base64.urlsafe_b64decode(s)
        except (binascii.Error, ValueError):
            raise bad_request(f"'{where}' is not valid base64", param=where) from None


def decode_image(data: bytes, where: str, limits: ImageLimits) -> RequestImage:
    from PIL import Image, UnidentifiedImageError

    if len(data) > limits.max_bytes:
        raise bad_request(
            f"'{where}': the image is {len(data) / 2**20:.1f} MiB, more than the "
            f"{limits.max_bytes / 2**20:.1f} MiB limit per image (--max-image-mb)",
            param=where,
        )
    if not data:
        raise bad_request(f"'{where}': the image is empty", param=where)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=list(FORMATS))  # reads the header only
            w, h = img.size
            if w <= 0 or h <= 0:
                raise bad_request(f"'{where}': the image has zero size ({w}x{h})", param=where)
            if w * h > limits.max_pixels:
                raise bad_request(
                    f"'{where}': the image is {w}x{h} = {w * h} pixels, more than the limit of "
                    f"{limits.max_pixels} (--max-image-pixels)",
                    param=where,
                )
            _load(img)  # decode now: a truncated or corrupt file fails here
            del img
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise bad_request(
            f"'{where}': cannot decode the image ({_short(e)}); supported formats: {', '.join(FORMATS)}", param=where
        ) from None
    except APIError:
        raise
    except Exception as e:  # PIL's decoders fail in many ways on hostile files (OSError, SyntaxError,
        #                     struct.error, IndexError, MemoryError, ...): all mean "not a usable image"
        raise bad_request(
            f"'{where}': cannot decode the image ({type(e).__name__}: {_short(e)})", param=where
        ) from None
    return RequestImage(data=data, digest=hashlib.sha256(data).hexdigest(), width=w, height=h)


def _load(img):
    img.seek(0)  # animations: the first frame
    img.load()
    return img


def _decode(data: bytes):
    """Decode bytes that decode_image() accepted (same plugins, same frame)."""
    from PIL import Image

    return _load(Image.open(io.BytesIO(data), formats=list(FORMATS)))


def _short(e: Exception) -> str:
    text = str(e) or type(e).__name__
    return text if len(text) <= 200 else text[:200] + "..."
