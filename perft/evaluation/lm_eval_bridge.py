"""lm-evaluation-harness bridge: evaluate a PERFT (or any HF-like) model on every lm-eval task.

Two ways in:
- `evaluate_with_lm_eval(model, tokenizer, ["hellaswag", ...])` wraps a model object in
  lm-eval's `HFLM` and runs `lm_eval.simple_evaluate`, so each task keeps lm-eval's own
  prompts, metrics and leaderboard protocol.
- Importing this module registers the model name "perft", so
  `lm_eval.simple_evaluate(model="perft", model_args="pretrained=BASE,adapter=DIR")`
  loads a base model with a PERFT adapter the way `perft eval` does.

lm-eval is an optional dependency (`pip install perft[eval]`).
"""

from __future__ import annotations

import contextlib
import difflib
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from perft.errors import PerftError
from perft.evaluation.generation import ensure_pad_token

try:
    import lm_eval
    from lm_eval.api.registry import register_model
    from lm_eval.models.huggingface import HFLM
except ImportError as _err:  # pragma: no cover - exercised only without the extra installed
    raise PerftError(
        f"the lm-eval bridge needs lm-evaluation-harness ({_err}); install it with `pip install 'perft[eval]'`"
    ) from None


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _check_model(model: Any) -> None:
    """HFLM reads `config`, `device`, `eval()` and `tie_weights()` from a model object."""
    missing = [name for name in ("config", "device", "generate") if not hasattr(model, name)]
    if missing:
        raise PerftError(
            f"the model object lacks {', '.join(missing)}; pass a Hugging Face causal LM or a PerftModel"
        )
    if not hasattr(model, "tie_weights"):
        # A wrapper without it: tying is a no-op for an already-built model.
        model.tie_weights = lambda *args, **kwargs: None


def make_lm(model: Any, tokenizer: Any, *, batch_size: int | str = 16, **hflm_kwargs: Any) -> HFLM:
    """lm-eval's `HFLM` around a model object already on its device (no copy, no reload)."""
    _check_model(model)
    ensure_pad_token(tokenizer)
    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, **hflm_kwargs)


@register_model("perft")
class PerftLM(HFLM):
    """lm-eval model "perft": `pretrained=<base model>`, optional `adapter=<PERFT adapter folder>`.

    Also accepts a model object as `pretrained` (then `tokenizer` must be given).
    """

    def __init__(
        self,
        pretrained: Any,
        adapter: str | None = None,
        tokenizer: Any = None,
        dtype: str = "auto",
        trust_remote_code: bool = False,
        device: str | None = None,
        batch_size: int | str = 1,
        **kwargs: Any,
    ) -> None:
        if isinstance(pretrained, (str, Path)):
            from perft.loading import load_base_model, load_tokenizer

            model = load_base_model(str(pretrained), dtype=dtype, trust_remote_code=bool(trust_remote_code))
            if adapter:
                from perft.evaluation.adapter_dirs import resolve_adapter_dir
                from perft.model import PerftModel

                model = PerftModel.from_pretrained(model, resolve_adapter_dir(adapter))
            model.to(device or _default_device())
            if tokenizer is None or isinstance(tokenizer, (str, Path)):
                tokenizer = load_tokenizer(str(tokenizer or pretrained), trust_remote_code=bool(trust_remote_code))
        else:
            if adapter:
                raise PerftError("pass `adapter` only with a model path; wrap a model object with PerftModel yourself")
            if tokenizer is None:
                raise PerftError("a model object needs its tokenizer: pass tokenizer=...")
            model = pretrained
        _check_model(model)
        ensure_pad_token(tokenizer)
        super().__init__(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, **kwargs)


def task_manager(include_path: str | Path | Sequence[str | Path] | None = None, *, include_defaults: bool = True) -> Any:
    """lm-eval's task index: its built-in tasks and/or the YAML tasks under `include_path`."""
    from lm_eval.tasks import TaskManager

    if include_path is not None:
        paths = [include_path] if isinstance(include_path, (str, Path)) else list(include_path)
        for path in paths:
            if not Path(path).exists():
                raise PerftError(f"lm-eval include path {path} does not exist; give a folder of task YAML files")
        include_path = [str(p) for p in paths]
    return TaskManager(include_path=include_path, include_defaults=include_defaults)


def manager_for(tasks: Sequence[str], include_path: str | Path | Sequence[str | Path] | None = None) -> Any:
    """A task index that knows `tasks`: only `include_path` when it holds them all (indexing lm-eval's
    thousands of built-in tasks takes many seconds), else also the built-in tasks."""
    if include_path:
        local = task_manager(include_path, include_defaults=False)
        if all(t.strip() in set(local.all_tasks) for t in tasks if t.strip()):
            return local
    return task_manager(include_path, include_defaults=True)


def check_tasks(tasks: Sequence[str], manager: Any) -> list[str]:
    """Fail before any work on task names lm-eval does not know, suggesting close ones."""
    tasks = [t.strip() for t in tasks if t and t.strip()]
    if not tasks:
        raise PerftError("no lm-eval tasks given; pass e.g. --lm-eval-tasks hellaswag,arc_easy")
    known = set(manager.all_tasks)
    for task in tasks:
        if task not in known and not Path(task).is_file():
            close = difflib.get_close_matches(task, sorted(known), n=5)
            hint = f"; did you mean {', '.join(close)}?" if close else "; `lm_eval ls tasks` lists them"
            raise PerftError(f"lm-eval does not know task {task!r}{hint}")
    return tasks


@contextlib.contextmanager
def quiet_progress() -> Iterator[None]:
    """No lm-eval progress bars: lm-eval creates them without a switch (context building, requests),
    so every `tqdm` its loaded modules imported is swapped for a disabled one while this is active."""
    from tqdm.std import tqdm as tqdm_class

    def silent(*args: Any, **kwargs: Any) -> Any:
        kwargs["disable"] = True
        return tqdm_class(*args, **kwargs)

    swapped = []
    for name, module in list(sys.modules.items()):
        bar = getattr(module, "tqdm", None) if name.split(".")[0] == "lm_eval" else None
        if isinstance(bar, type) and issubclass(bar, tqdm_class):
            swapped.append((module, bar))
            module.tqdm = silent
    try:
        yield
    finally:
        for module, bar in swapped:
            module.tqdm = bar


def evaluate_with_lm_eval(
    model: Any,
    tokenizer: Any,
    tasks: Sequence[str],
    *,
    include_path: str | Path | Sequence[str | Path] | None = None,
    include_defaults: bool = True,
    batch_size: int | str = 16,
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    log_samples: bool = False,
    bootstrap_iters: int = 100000,
    manager: Any = None,
    progress: bool = True,
    **simple_evaluate_kwargs: Any,
) -> dict[str, Any]:
    """Run lm-eval's `simple_evaluate` on a model object and return its results dict.

    `manager` reuses a `task_manager(...)` already built (indexing lm-eval's tasks takes seconds);
    `progress=False` shows none of lm-eval's progress bars.
    """
    if manager is None:
        manager = task_manager(include_path, include_defaults=include_defaults)
    tasks = check_tasks(tasks, manager)
    lm = model if isinstance(model, HFLM) else make_lm(model, tokenizer, batch_size=batch_size)
    with contextlib.nullcontext() if progress else quiet_progress():
        results = lm_eval.simple_evaluate(
            model=lm,
            tasks=list(tasks),
            task_manager=manager,
            limit=limit,
            num_fewshot=num_fewshot,
            log_samples=log_samples,
            bootstrap_iters=bootstrap_iters,
            **simple_evaluate_kwargs,
        )
    if results is None:  # non-zero ranks in distributed runs
        return {}
    return dict(results)


def format_results(results: dict[str, Any]) -> str:
    """lm-eval's own results table (the format its leaderboard numbers are quoted in)."""
    from lm_eval.utils import make_table

    table = make_table(results)
    if results.get("groups"):
        table += "\n" + make_table(results, "groups")
    return table
