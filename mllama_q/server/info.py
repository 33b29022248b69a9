"""What the server says about its model: names it answers to, and the descriptions the model
listing endpoints return (Ollama /api/tags, /api/show, /api/ps; OpenAI /v1/models)."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np


def rfc3339(ts: float | None = None, local: bool = False) -> str:
    """Go's time.RFC3339Nano as Ollama writes it: UTC with "Z" (created_at), or local time with
    its offset (modified_at)."""
    if local:
        return datetime.fromtimestamp(ts).astimezone().isoformat()
    dt = datetime.now(timezone.utc) if ts is None else datetime.fromtimestamp(ts, timezone.utc)
    return dt.isoformat().replace("+00:00", "Z")


def human_number(n: int) -> str:
    """Ollama's format.HumanNumber for parameter counts: 10.7B, 110M, 1.2K."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            v = n / scale
            return f"{v:.0f}{unit}" if v >= 100 or float(v).is_integer() else f"{v:.1f}{unit}"
    return str(n)


def _metadata(reader) -> dict:
    """Every metadata key -> Python value (gguf-py GGUFReader, or our GGUFFile's .metadata)."""
    meta = getattr(reader, "metadata", None)
    if meta is not None:
        return dict(meta.items())
    from mllama_q.gguf_file import field_value

    return {k: field_value(reader, k, None) for k in reader.fields if not k.startswith("GGUF.")}


def _jsonable(v, verbose: bool):
    if isinstance(v, (bool, int, float, str)) or v is None:
        return v
    if isinstance(v, (np.integer, np.floating, np.bool_)):
        return v.item()
    if hasattr(v, "tolist") or isinstance(v, (list, tuple)) or hasattr(v, "__len__"):
        if not verbose:
            return []  # Ollama: arrays are only populated with "verbose": true
        seq = v.tolist() if hasattr(v, "tolist") else list(v)
        return [_jsonable(x, True) for x in seq]
    return str(v)


@dataclass
class ModelInfo:
    path: str
    name: str  # the name listings show
    aliases: list[str] = field(default_factory=list)
    size: int = 0
    modified: float = 0.0
    digest: str = ""
    details: dict = field(default_factory=dict)
    capabilities: list[str] = field(default_factory=list)
    system: str | None = None  # the Ollama manifest's system message (/api/show "system")
    _config_details: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_path(cls, path, name: str | None = None, aliases=()) -> "ModelInfo":
        p = Path(os.fspath(path))
        st = p.stat()
        name = name or p.stem
        # Ollama's digest names the manifest blob; hashing a 7 GB file at start-up would take
        # a minute, so this identifies the file by path, size and modification time instead.
        digest = hashlib.sha256(f"{p.resolve()}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()
        return cls(path=str(p), name=name, aliases=list(aliases), size=st.st_size, modified=st.st_mtime, digest=digest)

    @classmethod
    def from_store(cls, resolved, name: str | None = None, aliases=()) -> "ModelInfo":
        """A model of the Ollama store (mllama_q.store.Resolved), listed as Ollama lists it
        (server/model_list_cache.go buildModelListSummary at ollama 9db4bdbad^): its short name
        ("llama3.2-vision:latest"), the manifest's sha256 as digest and its mtime as modified_at,
        every layer's size, and the details of the manifest's config blob where it has them."""
        m = resolved.manifest
        short = str(resolved.name)
        host, ns, model, tag = resolved.name.parts
        names = [short, f"{host}/{ns}/{model}:{tag}", f"{ns}/{model}:{tag}"]
        name = name or short
        info = cls(
            path=str(resolved.model_path),
            name=name,
            aliases=[*aliases, *(n for n in names if n != name)],
            size=m.size,
            modified=m.modified,
            digest=m.digest,
        )
        cfg = resolved.config
        fams = cfg.get("model_families")
        info._config_details = {
            k: v
            for k, v in (
                ("family", cfg.get("model_family")),
                ("parameter_size", cfg.get("model_type")),
                ("quantization_level", cfg.get("file_type")),
                ("families", fams if isinstance(fams, list) and all(isinstance(f, str) for f in fams) else None),
            )
            if v and (isinstance(v, (str, list)))
        }
        info.system = resolved.defaults.get("system")
        return info

    def describe(self, model) -> None:
        """Details and capabilities from the loaded model."""
        from mllama_q import gguf_keys as K

        reader = model._reader
        meta = _metadata(reader)
        n_params = int(sum(int(np.prod(t.shape)) for t in _tensors(reader)))
        inv = {v: k for k, v in K.FILE_TYPE.items()}
        ftype = meta.get(K.GENERAL_FILE_TYPE)
        self.details = {
            "parent_model": "",
            "format": "gguf",
            "family": K.ARCH,
            "families": [K.ARCH],
            "parameter_size": human_number(n_params),
            "quantization_level": inv.get(int(ftype), f"type {ftype}").upper() if ftype is not None else "unknown",
        }
        self.details.update(self._config_details)  # what Ollama itself would list
        self.capabilities = ["completion"] + (["vision"] if getattr(model, "has_vision", False) else [])
        if self.system is None:
            self.system = (getattr(model, "store_defaults", None) or {}).get("system")
        self._meta = meta
        self._n_params = n_params

    def matches(self, requested: str) -> bool:
        """Does a request's model name mean this model? The name, an alias, the path given, the
        file name or its stem; ":latest" is implied as in Ollama names; case-insensitive."""

        def norm(s: str) -> str:
            s = s.strip().casefold()
            return s[: -len(":latest")] if s.endswith(":latest") else s

        p = Path(self.path)
        known = {norm(x) for x in [self.name, *self.aliases, self.path, p.name, p.stem]}
        return norm(requested) in known

    def model_info(self, verbose: bool = False) -> dict:
        from mllama_q import gguf_keys as K

        out = {k: _jsonable(v, verbose) for k, v in self._meta.items()}
        out.setdefault(K.GENERAL_ARCHITECTURE, K.ARCH)
        out["general.parameter_count"] = self._n_params
        return out


def _tensors(reader):
    t = reader.tensors
    return t.values() if isinstance(t, dict) else t
