"""Models by name: Ollama's local store (read-only), for `Model("llama3.2-vision")`.

    model_path, projector_path, defaults = resolve_model("llama3.2-vision:11b")
    model_path, projector_path, defaults = resolve_model("/path/to/file.gguf")   # a path passes through

The store (facts from ollama/ollama at 9db4bdbad^): the root is $OLLAMA_MODELS, else
~/.ollama/models (envconfig/config.go Models); the Linux service install keeps it in
/usr/share/ollama/.ollama/models, which is searched too when $OLLAMA_MODELS is unset. A model
name [host/][namespace/]model[:tag] defaults to registry.ollama.ai / library / latest
(types/model/name.go ParseName); its manifest is manifests/<host>/<namespace>/<model>/<tag>,
JSON whose `layers` name blobs by media type (server/images.go GetModel) and digest
"sha256:<64 hex>", stored as blobs/sha256-<hex> (manifest/paths.go BlobsPath).

Everything in the store is untrusted input: a name is validated with Ollama's own part rules
(so no "..", "/" or absolute part can leave the manifests directory); a manifest must be a
small JSON object of well-formed layers; every blob a model needs must exist, be a regular file
(symlinks are followed: tools that share a store use them) and have the size the manifest
gives; small layers (params, system, config) are read and their sha256 checked. The big model
and projector blobs are NOT hashed at load: hashing 8 GB takes seconds to minutes (the warm-load
target is 2 s), Ollama already checked each digest when it pulled the blob (server/images.go
verifyBlob), and a truncated or damaged GGUF is still caught by size and by the GGUF checks.
`verify=True` (`mllama-q list --verify`) hashes them.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .gguf_file import ModelFileError, ModelFileNotFoundError

DEFAULT_HOST = "registry.ollama.ai"
DEFAULT_NAMESPACE = "library"
DEFAULT_TAG = "latest"
SERVICE_ROOT = Path("/usr/share/ollama/.ollama/models")

MEDIA_MODEL = "application/vnd.ollama.image.model"
MEDIA_PROJECTOR = "application/vnd.ollama.image.projector"
MEDIA_PARAMS = "application/vnd.ollama.image.params"
MEDIA_SYSTEM = "application/vnd.ollama.image.system"
MEDIA_TEMPLATE = "application/vnd.ollama.image.template"
MEDIA_ADAPTER = "application/vnd.ollama.image.adapter"

MAX_MANIFEST_BYTES = 1 << 20
MAX_SMALL_LAYER_BYTES = 1 << 20  # params, system, config: read into memory
MAX_LAYERS = 256
_DIGEST = re.compile(r"^sha256[:-]([0-9a-fA-F]{64})$")  # manifest/paths.go BlobsPath
_MISSING = "!MISSING!"  # types/model/name.go MissingPart (an invalid part)


class StoreError(ModelFileError):
    """A malformed name, manifest or blob in the Ollama store."""


# ---------------------------------------------------------------------------
# Names (types/model/name.go)
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class OllamaName:
    host: str
    namespace: str
    model: str
    tag: str

    def __str__(self) -> str:
        """The shortest form Ollama displays (DisplayShortest)."""
        if self.host.lower() != DEFAULT_HOST:
            return f"{self.host}/{self.namespace}/{self.model}:{self.tag}"
        if self.namespace.lower() != DEFAULT_NAMESPACE:
            return f"{self.namespace}/{self.model}:{self.tag}"
        return f"{self.model}:{self.tag}"

    @property
    def parts(self) -> tuple[str, str, str, str]:
        return (self.host, self.namespace, self.model, self.tag)


def _valid_part(kind: str, s: str) -> bool:
    """isValidPart: 1..80 chars (host 350), first alphanumeric or '_', then alphanumerics,
    '_', '-', '.' (not in a namespace) and ':' (host only)."""
    if not 1 <= len(s) <= (350 if kind == "host" else 80):
        return False
    for i, c in enumerate(s):
        ok = c.isascii() and (c.isalnum() or c == "_")
        if i > 0 and not ok:
            ok = c in "_-" or (c == "." and kind != "namespace") or (c == ":" and kind == "host")
        if not ok:
            return False
    return True


def _cut_last(s: str, sep: str) -> tuple[str, str, bool]:
    i = s.rfind(sep)
    if i < 0:
        return s, "", False
    return (s[:i] or _MISSING), (s[i + len(sep) :] or _MISSING), True


def parse_name(s: str, fill_defaults: bool = True) -> OllamaName:
    """An Ollama model name, with the defaults filled in (ParseName = ParseNameBare + Merge) or
    not (ParseNameBare); StoreError unless every part is valid (IsFullyQualified)."""
    if not isinstance(s, str):
        raise StoreError(f"a model name must be a string, got {type(s).__name__}")
    rest, host, namespace, tag = s, "", "", ""
    if rest.rfind(":") > rest.rfind("/"):
        rest, tag, _ = _cut_last(rest, ":")
    rest, model, more = _cut_last(rest, "/")
    if not more:
        model = rest
    else:
        rest, namespace, more = _cut_last(rest, "/")
        if not more:
            namespace = rest
        else:
            host = rest.split("://", 1)[1] if "://" in rest else rest
    if fill_defaults:
        host, namespace, tag = host or DEFAULT_HOST, namespace or DEFAULT_NAMESPACE, tag or DEFAULT_TAG
    name = OllamaName(host, namespace, model, tag)
    for kind, part in zip(("host", "namespace", "model", "tag"), name.parts):
        if not _valid_part(kind, part):
            raise StoreError(
                f"{s!r} is not a valid Ollama model name (bad {kind} {part!r}: "
                "[host/][namespace/]model[:tag], letters, digits, '_', '-', '.')"
            )
    return name


# ---------------------------------------------------------------------------
# The store
# ---------------------------------------------------------------------------
def store_roots() -> list[Path]:
    """Where Ollama keeps models: [$OLLAMA_MODELS], else ~/.ollama/models and the Linux service's."""
    env = os.environ.get("OLLAMA_MODELS")
    if env:
        return [Path(env).expanduser()]
    return [Path.home() / ".ollama" / "models", SERVICE_ROOT]


@dataclass
class Layer:
    media_type: str
    digest: str  # the 64 hex digits
    size: int
    path: Path  # root / blobs / sha256-<hex>


@dataclass
class Manifest:
    name: OllamaName
    path: Path
    root: Path
    layers: list[Layer]
    config: Layer | None
    digest: str = ""  # sha256 of the manifest file: the model's digest in Ollama's listings (manifest.go)
    modified: float = 0.0  # the manifest file's mtime: the model's modified_at there

    @property
    def size(self) -> int:
        """Every layer and the config, as Ollama's listings count it (manifest.go Size)."""
        return sum(la.size for la in self.layers) + (self.config.size if self.config is not None else 0)

    def of_type(self, media_type: str) -> list[Layer]:
        return [la for la in self.layers if la.media_type == media_type]


@dataclass
class Resolved:
    """A model found in the store: its blobs and the defaults its manifest sets."""

    name: OllamaName
    manifest: Manifest
    model_path: Path
    projector_path: Path | None
    defaults: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)  # the manifest's config blob (model_family, file_type, ...)


def _layer(d: Any, root: Path, where: str) -> Layer:
    if not isinstance(d, dict):
        raise StoreError(f"{where}: a layer must be an object, got {type(d).__name__}")
    media, digest, size = d.get("mediaType"), d.get("digest"), d.get("size")
    if not isinstance(media, str) or not media:
        raise StoreError(f"{where}: layer without a mediaType")
    m = _DIGEST.match(digest) if isinstance(digest, str) else None
    if m is None:
        raise StoreError(f"{where}: layer {media} has digest {digest!r}, not 'sha256:' + 64 hex digits")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise StoreError(f"{where}: layer {media} has size {size!r}, not a byte count")
    hexd = m.group(1).lower()
    return Layer(media, hexd, size, root / "blobs" / f"sha256-{hexd}")


def _read_manifest(root: Path, name: OllamaName, path: Path) -> Manifest:
    where = f"manifest {path}"
    try:
        st = path.stat()
        if not stat.S_ISREG(st.st_mode):
            raise StoreError(f"{where} is not a regular file")
        if st.st_size > MAX_MANIFEST_BYTES:
            raise StoreError(f"{where} is {st.st_size} bytes: too large for a manifest")
        raw = path.read_bytes()
    except OSError as e:
        raise StoreError(f"{where}: cannot read it ({e.strerror or e})") from None
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise StoreError(f"{where} is not valid JSON ({e})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("layers"), list):
        raise StoreError(f"{where} has no 'layers' list")
    if len(doc["layers"]) > MAX_LAYERS:
        raise StoreError(f"{where} lists {len(doc['layers'])} layers")
    layers = [_layer(d, root, where) for d in doc["layers"]]
    cfg = doc.get("config")
    config = _layer(cfg, root, where + " (config)") if isinstance(cfg, dict) and cfg.get("digest") else None
    return Manifest(name, path, root, layers, config, hashlib.sha256(raw).hexdigest(), st.st_mtime)


def _find_manifest(name: OllamaName, roots: list[Path]) -> tuple[Path, Path] | None:
    """(root, manifest path) of `name`, trying the exact path, then a case-insensitive match per
    level (Ollama compares names case-insensitively, types/model/name.go EqualFold)."""
    for root in roots:
        base = root / "manifests"
        exact = base.joinpath(*name.parts)
        if _is_file(exact):
            return root, exact
        cur = base
        for part in name.parts:
            try:
                hits = [e for e in os.listdir(cur) if e.lower() == part.lower()]
            except OSError:
                break
            if not hits:
                break
            cur = cur / min(hits)
        else:
            if _is_file(cur):
                return root, cur
    return None


def _is_file(p: Path) -> bool:
    try:
        return p.is_file()
    except OSError:  # e.g. no permission to look inside the Linux service's store
        return False


def _check_blob(layer: Layer, name: OllamaName) -> None:
    p = layer.path
    try:
        st = p.stat()  # follows symlinks
    except FileNotFoundError:
        kind = "a dangling symlink" if p.is_symlink() else "missing"
        raise StoreError(
            f"blob sha256-{layer.digest[:12]}... ({layer.media_type}) of {name} is {kind} ({p}): "
            f"the download is incomplete; run `ollama pull {name}`"
        ) from None
    except OSError as e:
        raise StoreError(f"blob {p} of {name}: cannot read it ({e.strerror or e})") from None
    if not stat.S_ISREG(st.st_mode):
        raise StoreError(f"blob {p} of {name} is not a regular file")
    if st.st_size != layer.size:
        raise StoreError(
            f"blob {p} of {name} is {st.st_size} bytes but the manifest says {layer.size}: "
            f"incomplete or damaged; run `ollama pull {name}`"
        )


def sha256_file(path: Path, progress=None, chunk: int = 8 << 20) -> str:
    """Hex sha256 of a file, read in chunks; progress(done_bytes, total_bytes) after each."""
    h = hashlib.sha256()
    total = os.path.getsize(path)
    done = 0
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
            done += len(b)
            if progress is not None:
                progress(done, total)
    return h.hexdigest()


def verify_blob(layer: Layer, name: OllamaName, progress=None) -> None:
    """StoreError unless the blob's sha256 is its digest."""
    _check_blob(layer, name)
    got = sha256_file(layer.path, progress)
    if got != layer.digest:
        raise StoreError(
            f"blob {layer.path} of {name} has sha256 {got}, not its name's {layer.digest}: "
            f"damaged; run `ollama pull {name}`"
        )


def _small_layer(layer: Layer, name: OllamaName) -> bytes:
    _check_blob(layer, name)
    if layer.size > MAX_SMALL_LAYER_BYTES:
        raise StoreError(f"{layer.media_type} layer of {name} is {layer.size} bytes: too large")
    data = layer.path.read_bytes()
    if hashlib.sha256(data).hexdigest() != layer.digest:
        raise StoreError(f"blob {layer.path} of {name} does not match its sha256 digest: damaged")
    return data


def _json_layer(layer: Layer, name: OllamaName) -> dict:
    try:
        doc = json.loads(_small_layer(layer, name).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise StoreError(f"{layer.media_type} layer of {name} is not valid JSON ({e})") from None
    if not isinstance(doc, dict):
        raise StoreError(f"{layer.media_type} layer of {name} is not a JSON object")
    return doc


def _number(v, key: str, lo: float, hi: float, where: str, integer: bool = False):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not float(v).is_integer()):
        raise StoreError(f"{where}: {key} must be {'an integer' if integer else 'a number'}, got {v!r}")
    if not (math.isfinite(v) and lo <= v <= hi):
        raise StoreError(f"{where}: {key} = {v!r} is outside [{lo}, {hi}]")
    return int(v) if integer else float(v)


def params_defaults(params: dict, where: str) -> dict:
    """Ollama options (api/types.go Options JSON names) -> mllama-q's generate/Model names.

    temperature, top_p, top_k, min_p, repeat_penalty -> repetition_penalty, seed, stop,
    num_ctx -> n_ctx, num_predict (> 0) -> max_new_tokens. Other options are ignored."""
    out: dict = {}
    table = (
        ("temperature", "temperature", 0, 100, False),
        ("top_p", "top_p", 0, 1, False),
        ("top_k", "top_k", 0, 1 << 31, True),
        ("min_p", "min_p", 0, 1, False),
        ("repeat_penalty", "repetition_penalty", 1e-6, 100, False),
        ("seed", "seed", -(1 << 63), (1 << 64) - 1, True),
        ("num_ctx", "n_ctx", 1, 1 << 24, True),
    )
    for key, ours, lo, hi, integer in table:
        if key in params and params[key] is not None:
            out[ours] = _number(params[key], key, lo, hi, where, integer)
    if params.get("num_predict") is not None:
        n = _number(params["num_predict"], "num_predict", -2, 1 << 24, where, integer=True)
        if n > 0:
            out["max_new_tokens"] = n
    stop = params.get("stop")
    if stop is not None:
        stop = [stop] if isinstance(stop, str) else stop
        if (
            not isinstance(stop, list)
            or len(stop) > 64
            or not all(isinstance(s, str) and 0 < len(s) <= 1024 for s in stop)
        ):
            raise StoreError(f"{where}: stop must be a list of non-empty strings, got {params['stop']!r}")
        out["stop"] = list(stop)
    return out


def manifest_defaults(m: Manifest) -> dict:
    """Sampling defaults / stop strings (params layer) and the system message (system layer).

    The MEDIA_TEMPLATE layer is not read: it is a Go text/template for Ollama's own prompt
    rendering, and sets no stop strings or options (server/images.go GetModel takes the options
    from the params layer only). Prompts are rendered with the GGUF's chat template
    (tokenizer.chat_template, the checkpoint's Jinja template that Ollama's converter copied), or
    the embedded Llama 3.2 Vision one."""
    out: dict = {}
    for layer in m.of_type(MEDIA_PARAMS)[-1:]:  # GetModel: the last one wins
        out.update(params_defaults(_json_layer(layer, m.name), f"params layer of {m.name}"))
    for layer in m.of_type(MEDIA_SYSTEM)[-1:]:
        try:
            out["system"] = _small_layer(layer, m.name).decode("utf-8")
        except UnicodeDecodeError:
            raise StoreError(f"system layer of {m.name} is not UTF-8 text") from None
    return out


def resolve_name(name: str, roots: list[Path] | None = None, verify: bool = False, progress=None) -> Resolved:
    """Find an Ollama model by name; check its manifest and blobs (see the module doc)."""
    n = parse_name(name)
    roots = store_roots() if roots is None else [Path(r) for r in roots]
    hit = _find_manifest(n, roots)
    if hit is None:
        where = " or ".join(str(r) for r in roots)
        raise ModelFileNotFoundError(
            f"no file {name!r}, and no Ollama model {n} in {where} "
            "(`mllama-q list` shows the models found; $OLLAMA_MODELS sets the store)"
        )
    root, mpath = hit
    m = _read_manifest(root, n, mpath)
    models = m.of_type(MEDIA_MODEL)
    if len(models) != 1:
        raise StoreError(f"manifest {mpath} lists {len(models)} model layers ({MEDIA_MODEL}); expected one")
    projectors = m.of_type(MEDIA_PROJECTOR)
    if len(projectors) > 1:
        raise StoreError(f"manifest {mpath} lists {len(projectors)} projector layers; llama3.2-vision has one")
    if m.of_type(MEDIA_ADAPTER):
        raise StoreError(f"{n} carries a LoRA adapter layer ({MEDIA_ADAPTER}), which mllama-q does not apply")
    for layer in models + projectors:
        if verify:
            verify_blob(layer, n, progress)
        else:
            _check_blob(layer, n)
    config = _json_layer(m.config, n) if m.config is not None else {}
    return Resolved(n, m, models[0].path, projectors[0].path if projectors else None, manifest_defaults(m), config)


def _blob_manifest(path: Path) -> Resolved | None:
    """For a path of the form <root>/blobs/sha256-<hex>: the model whose manifest lists it as its
    model layer (so a two-file pair's projector is found from the text blob's path)."""
    m = re.fullmatch(r"sha256-([0-9a-f]{64})", path.name)
    if m is None or path.parent.name != "blobs":
        return None
    root = path.parent.parent
    for name, mpath in iter_manifests(root):
        try:
            man = _read_manifest(root, name, mpath)
        except StoreError:
            continue
        if any(la.digest == m.group(1) for la in man.of_type(MEDIA_MODEL)):
            return resolve_name(str(name), [root])
    return None


def find_model(name_or_path, roots: list[Path] | None = None, verify: bool = False) -> Resolved | None:
    """The store's model behind an Ollama model name, or behind a path that is a model blob inside
    an Ollama store; None for any other existing file (a GGUF given by path). Raises
    ModelFileNotFoundError (no such file or name) / StoreError (a broken store entry)."""
    s = os.fspath(name_or_path)
    p = Path(s)
    if p.exists() or p.is_symlink():
        if p.is_dir():
            raise ModelFileError(
                f"{s} is a directory, not a GGUF file (an Ollama model is given by name, "
                "a Hugging Face checkpoint is converted with `mllama-q convert`)"
            )
        return _blob_manifest(p.resolve() if p.is_symlink() else p) if p.exists() else None
    if s.endswith(".gguf") or s.startswith((os.sep, ".", "~")):
        raise ModelFileNotFoundError(f"model file not found: {s}")
    return resolve_name(s, roots, verify=verify)


def resolve_model(name_or_path, roots: list[Path] | None = None, verify: bool = False):
    """(model_path, projector_path | None, defaults) for a GGUF path or an Ollama model name.

    An existing path passes through (with its projector and defaults when it is a blob inside an
    Ollama store); anything else is looked up as a name (find_model). defaults: what the manifest
    sets, in generate()/Model's vocabulary (temperature, top_p, top_k, min_p, repetition_penalty,
    seed, stop, n_ctx, max_new_tokens, system). Raises ModelFileNotFoundError / StoreError.
    """
    s = os.fspath(name_or_path)
    r = find_model(s, roots, verify=verify)
    if r is None:
        return s, None, {}
    model_path = s if Path(s).exists() else str(r.model_path)  # a blob path given stays as given
    return model_path, (str(r.projector_path) if r.projector_path else None), r.defaults


def iter_manifests(root: Path):
    """(OllamaName, path) of every manifest file under root/manifests/<host>/<ns>/<model>/<tag>
    whose four parts are valid names (ParseNameFromFilepath); others are skipped."""
    base = Path(root) / "manifests"
    try:
        hosts = sorted(os.listdir(base))
    except OSError:
        return
    for h in hosts:
        for ns in _listdir(base / h):
            for mo in _listdir(base / h / ns):
                for tag in _listdir(base / h / ns / mo):
                    parts = (h, ns, mo, tag)
                    if all(_valid_part(k, v) for k, v in zip(("host", "namespace", "model", "tag"), parts)):
                        p = base.joinpath(*parts)
                        if _is_file(p):
                            yield OllamaName(*parts), p


def _listdir(p: Path) -> list[str]:
    try:
        return sorted(os.listdir(p))
    except OSError:  # not a directory, gone, or no permission
        return []


@dataclass
class StoreEntry:
    """One model of the store, for `mllama-q list`."""

    name: OllamaName
    root: Path
    family: str | None = None
    file_type: str | None = None
    size: int = 0
    layout: str = ""
    problem: str | None = None

    @property
    def is_mllama(self) -> bool:
        return self.family == "mllama"


def list_store(roots: list[Path] | None = None, verify: bool = False, progress=None) -> list[StoreEntry]:
    """Every model in the store(s), with its family (from the manifest's config blob), size,
    quantization and layout; a model that cannot be used carries the reason in `problem`."""
    roots = store_roots() if roots is None else [Path(r) for r in roots]
    out = []
    for root in roots:
        for name, _path in iter_manifests(root):
            e = StoreEntry(name, root)
            try:
                r = resolve_name(str(name), [root], verify=verify, progress=progress)
                fams = r.config.get("model_families")
                fam = r.config.get("model_family")
                fams = fams if isinstance(fams, list) else []
                e.family = "mllama" if "mllama" in fams or fam == "mllama" else (fam if isinstance(fam, str) else None)
                ft = r.config.get("file_type")
                e.file_type = ft if isinstance(ft, str) else None
                e.size = sum(la.size for la in r.manifest.layers if la.media_type in (MEDIA_MODEL, MEDIA_PROJECTOR))
                e.layout = "ollama two-file (v0.4-0.6)" if r.projector_path else "ollama one-file (v0.7+)"
            except (StoreError, ModelFileNotFoundError) as err:
                e.problem = str(err)
            out.append(e)
    return out


def apply_defaults(generation_defaults: dict, stop_ids: list[int], tokenizer, defaults: dict) -> list[int]:
    """Put a manifest's defaults into a Model: temperature / top_p / top_k into
    generation_defaults; each stop string that is exactly one special token (Ollama's llama3
    params stop on "<|eot_id|>", "<|start_header_id|>", ...) becomes a stop id, because generate
    decodes without special tokens; other stop strings go to generation_defaults["stop"].
    Returns the stop ids."""
    for k in ("temperature", "top_p", "top_k"):
        if k in defaults:
            generation_defaults[k] = defaults[k]
    ids, strings = set(stop_ids), []
    for s in defaults.get("stop", ()):
        tid = tokenizer.token_to_id(s) if tokenizer is not None else None
        if tid is not None and tokenizer.is_special(tid):
            ids.add(int(tid))
        else:
            strings.append(s)
    if strings:
        generation_defaults["stop"] = strings
    return sorted(ids)
