"""Which adapter folder a user means, and whether it fits the base model, before the model load.

`perft train` writes its final adapter to `<run>/adapter/`; a user naturally passes the run
folder itself, so `resolve_adapter_dir` accepts both. `warn_if_other_base` says (one line)
when the recorded base model differs from the one given.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from perft.config import CONFIG_NAME
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


_WARNED: set[tuple[str, str, str]] = set()


def warn_if_other_base(model: str | Path, adapter: str | Path, command: str = "perft") -> None:
    """One line on stderr when the adapter was trained on another base than `model`.

    By content when the adapter records the base's fingerprint (`perft.fingerprint`): a moved but
    identical model does not warn, a changed one at the same path does. Otherwise by the recorded
    `base_model_name_or_path` (PERFT and PEFT both write it). Type and shape mismatches are refused
    by `perft.methods.check_adapter_matches`."""
    from perft.fingerprint import base_fingerprint, recorded_fingerprint

    if not str(model):
        return
    try:
        saved = json.loads((Path(adapter) / CONFIG_NAME).read_text(encoding="utf-8"))
        recorded = saved.get("base_model_name_or_path")
    except (OSError, ValueError, RecursionError, AttributeError):
        return  # the adapter load reports a damaged config
    fingerprint = recorded_fingerprint(saved)
    current = base_fingerprint(model) if fingerprint else None
    key = (str(model), str(Path(adapter).resolve()), current or "")
    if key in _WARNED:  # said once per base and adapter (a command checks, then loads)
        return
    if fingerprint and current:
        if fingerprint != current:
            where = (f"{recorded}, whose weights or config have changed since" if recorded and
                     _same_base(str(recorded), str(model)) else f"{recorded or 'another base'}, not on {model}")
            _WARNED.add(key)
            print(
                f"{command}: warning: adapter {adapter} was trained on {where} (content fingerprint "
                f"{fingerprint[7:19]} then, {current[7:19]} now); its numbers are only meaningful on the base "
                "model it was made for",
                file=sys.stderr,
            )
        return
    if recorded and not _same_base(str(recorded), str(model)):
        _WARNED.add(key)
        print(
            f"{command}: warning: adapter {adapter} was trained on {recorded}, not on {model}; "
            "its numbers are only meaningful on the base model it was made for",
            file=sys.stderr,
        )
