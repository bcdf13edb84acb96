"""A content fingerprint of a base model folder: same weights and config, same fingerprint.

It identifies a base by what it holds, not where it lies, so a moved-but-identical model
resumes a run (and takes its adapters without a warning) while a changed one is caught. It
is cheap: `config.json` (without the fields that record where it was saved from) plus, for
every tensor of every `*.safetensors` file, its name, dtype, shape and the first and last
4 KiB of its bytes, read straight from the file without loading the model.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any

SAMPLE_BYTES = 4096
_PLACE_KEYS = ("_name_or_path", "transformers_version", "_commit_hash")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model")


def base_fingerprint(model: str | Path | None) -> str | None:
    """`sha256:<hex>` of a local model folder's content; None for a hub name or an unreadable folder."""
    if model is None:
        return None
    folder = Path(str(model)).expanduser()
    config = folder / "config.json"
    if not config.is_file():
        return None
    try:  # one computation per process while no file changed (a run asks at every checkpoint)
        stamp = tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.iterdir()) if p.is_file())
    except OSError:
        return None
    key = (str(folder.resolve()), stamp)
    if key not in _CACHE:
        _CACHE[key] = _compute(folder, config)
    return _CACHE[key]


_CACHE: dict[tuple[str, tuple], str | None] = {}


def _compute(folder: Path, config: Path) -> str | None:
    digest = hashlib.sha256()
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
        if isinstance(data, dict):
            data = {k: v for k, v in data.items() if k not in _PLACE_KEYS}
        digest.update(json.dumps(data, sort_keys=True, default=str).encode())
        for path in sorted(folder.glob("*.safetensors")):
            digest.update(path.name.encode())
            _hash_safetensors_sample(path, digest)
        for name in TOKENIZER_FILES:
            path = folder / name
            if path.is_file():
                digest.update(name.encode() + path.read_bytes())
    except (OSError, ValueError, RecursionError, struct.error):
        return None
    return "sha256:" + digest.hexdigest()


def _hash_safetensors_sample(path: Path, digest: Any) -> None:
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        if length > 100_000_000:
            raise ValueError(f"{path}: implausible safetensors header")
        header = json.loads(handle.read(length))
        start = 8 + length
        for name in sorted(k for k in header if k != "__metadata__"):
            info = header[name]
            begin, end = info["data_offsets"]
            digest.update(json.dumps([name, info["dtype"], info["shape"]]).encode())
            handle.seek(start + begin)
            digest.update(handle.read(min(SAMPLE_BYTES, end - begin)))
            if end - begin > SAMPLE_BYTES:
                handle.seek(start + max(begin + SAMPLE_BYTES, end - SAMPLE_BYTES))
                digest.update(handle.read(end - max(begin + SAMPLE_BYTES, end - SAMPLE_BYTES)))


def recorded_fingerprint(adapter_config: dict) -> str | None:
    """The base fingerprint an adapter config records (PERFT: `base_shapes.fingerprint`)."""
    shapes = adapter_config.get("base_shapes") if isinstance(adapter_config, dict) else None
    value = shapes.get("fingerprint") if isinstance(shapes, dict) else None
    return value if isinstance(value, str) else None
