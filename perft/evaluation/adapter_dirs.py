"""Which adapter folder a user means, and whether it fits the base model, before the model load.

`perft train` writes its final adapter to `<run>/adapter/`; a user naturally passes the run
folder itself, so `resolve_adapter_dir` accepts both. `check_adapter_matches` refuses an
adapter made for another model type or shape and warns (one line) when the recorded base
model differs from the one given.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from perft.config import CONFIG_NAME, PerftConfig
from perft.errors import PerftError


def resolve_adapter_dir(path: str | Path) -> str:
    """`path` if it holds an adapter, else the adapter a `perft train` run folder exported (`path/adapter`)."""
    directory = Path(path)
    if not directory.is_dir():
        raise PerftError(f"adapter directory {path} does not exist; pass the folder `perft train` wrote")
    if (directory / CONFIG_NAME).is_file():
        return str(path)
    exported = directory / "adapter"
    if (exported / CONFIG_NAME).is_file():
        return str(exported)
    raise PerftError(
        f"no {CONFIG_NAME} in {path} (nor in {exported}): pass an adapter folder, e.g. a run's "
        "adapter/ or checkpoint-N/, or the run folder `perft train --output` wrote"
    )


def _same_base(recorded: str, given: str) -> bool:
    """Same base model: equal as given, as resolved local paths, or (hub name vs local copy) by last name."""
    if recorded == given:
        return True
    a, b = Path(recorded), Path(given)
    if a.exists() and b.exists():
        return a.resolve() == b.resolve()
    return a.name == b.name  # "allenai/OLMoE-1B-7B-0924" and "/models/OLMoE-1B-7B-0924"


def check_adapter_matches(model: str, adapter: str, command: str = "perft eval") -> PerftConfig:
    """Refuse an adapter made for another model type or hidden size; warn when its recorded base differs."""
    config = PerftConfig.load(Path(adapter))
    recorded = config.base_model_name_or_path
    if recorded and not _same_base(str(recorded), str(model)):
        print(
            f"{command}: warning: adapter {adapter} was trained on {recorded}, not on {model}; "
            "its numbers are only meaningful on the base model it was made for",
            file=sys.stderr,
        )
    base_config = Path(model) / "config.json"
    if not base_config.is_file():
        return config  # a hub name: PerftModel.from_pretrained checks after loading
    try:
        base = json.loads(base_config.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return config  # the model load reports it
    if not isinstance(base, dict):
        return config
    if config.model_type and base.get("model_type") and config.model_type != base["model_type"]:
        raise PerftError(
            f"adapter {adapter} was trained on a {config.model_type} model "
            f"({config.base_model_name_or_path}), not on this {base['model_type']} model {model}: "
            "evaluate it with the base model it was made for"
        )
    want = (config.base_shapes or {}).get("hidden_size")
    have = base.get("hidden_size") or (base.get("text_config") or {}).get("hidden_size")
    if want is not None and have is not None and want != have:
        raise PerftError(
            f"adapter {adapter} was built for hidden_size={want} but {model} has hidden_size={have}: "
            f"evaluate it with {config.base_model_name_or_path or 'the base model it was made for'}"
        )
    return config
