"""The embedded default: a small pretrained OLMoE, its corpus, and the shipped tasks.

- `default_base_model_path()`: the committed checkpoint `perft/assets/tiny-olmoe` (built by
  `perft pretrain` with its defaults); if it is missing (e.g. a trimmed install), the same
  recipe builds it once, deterministically, into the cache directory.
- `default_task_dir()`: `perft/assets/tasks/dataset`, holding `<task>/train.json`,
  `<task>/test.json` and `<task>/task.json` (scoring info) in the LLM-Adapters layout; if it is
  missing, the deterministic generators write it into the cache directory.

The cache directory is `$PERFT_CACHE`, else `~/.cache/perft`.
"""

from __future__ import annotations

import os
from pathlib import Path

ASSETS = Path(__file__).resolve().parent.parent / "assets"
SHIPPED_MODEL = ASSETS / "tiny-olmoe"
SHIPPED_TASKS = ASSETS / "tasks" / "dataset"
MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def cache_dir() -> Path:
    """Where built defaults are cached: `$PERFT_CACHE`, else `~/.cache/perft`."""
    return Path(os.environ.get("PERFT_CACHE") or Path.home() / ".cache" / "perft")


def _complete(directory: Path) -> bool:
    return all((directory / name).is_file() for name in MODEL_FILES)


def default_base_model_path() -> Path:
    """Directory of the embedded default base model (loadable with `from_pretrained`)."""
    if _complete(SHIPPED_MODEL):
        return SHIPPED_MODEL
    built = cache_dir() / "tiny-olmoe"
    if not _complete(built):
        from perft.tiny.pretrain import PretrainConfig, pretrain

        print(f"perft: the embedded default model is not installed; building it into {built} (minutes, once)")
        pretrain(PretrainConfig(output=str(built)))
    return built


def default_task_dir() -> Path:
    """Directory with `<task>/{train,test,task}.json` for every shipped task."""
    from perft.tiny.tasks import TASKS, write_task_files

    if all((SHIPPED_TASKS / t / "test.json").is_file() for t in TASKS):
        return SHIPPED_TASKS
    built = cache_dir() / "tasks" / "dataset"
    if not all((built / t / "test.json").is_file() for t in TASKS):
        write_task_files(built)
    return built


__all__ = ["cache_dir", "default_base_model_path", "default_task_dir"]
