"""`TrainingConfig`: every setting of `perft train`, from a YAML file and/or command-line flags.

One dataclass is the single source of truth: the CLI builds one flag per field from it,
YAML keys are its field names (unknown keys are an error, with the closest known name), and
`validate()` refuses impossible settings before any data or model is touched.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from perft.adapter_kinds import DROPOUT_MASKS, INIT_SCHEMES, adapter_kinds
from perft.config import ACTIVATIONS, PerftConfig
from perft.data.prompts import PROMPT_STYLES
from perft.errors import PerftError
from perft.methods import get_method, method_names
from perft.quantization import QUANT_TYPES_4BIT, QUANTIZATION_HELP, expert_quantization
from perft.training.aliases import TRANSFORMERS_ALIASES, TRANSFORMERS_INSTEAD, translate_aliases
from perft.variants import variant_names


class _Registered:
    """A live view of a registry's names, so something registered later is a valid choice too."""

    def __init__(self, names: Any) -> None:
        self._names = names

    def __iter__(self) -> Any:
        return iter(self._names())

    def __contains__(self, name: object) -> bool:
        return name in self._names()

    def __len__(self) -> int:
        return len(self._names())


SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup", "polynomial", "inverse_sqrt")
REPORTERS = ("tensorboard", "wandb", "none")
STRATEGIES = ("ddp", "fsdp")
PRECISIONS = ("auto", "true", "false")
MODEL_DTYPES = ("auto", "bfloat16", "float16", "float32")
MAX_SEED = 2**32 - 1
#: The paper's balance-loss coefficient (both routers) by base-model family; 0.01 elsewhere.
PAPER_AUX_COEF = {"mixtral": 0.02}
PAPER_AUX_COEF_DEFAULT = 0.01
MAX_INT = 2**31 - 1  # sizes, steps and token counts beyond this are typos (and overflow tokenizers)

# Fields that may change between a run and its resumption: where things go, how they are
# shown, and memory knobs that do not change the maths of a step.
RESUMABLE_CHANGES = frozenset({
    "output", "resume", "overwrite_output_dir", "report_to", "wandb_project", "run_name", "progress",
    "logging_steps", "eval_steps", "save_steps", "save_total_limit", "micro_batch_size", "eval_batch_size",
    "gradient_checkpointing", "strategy", "trust_remote_code", "config",
})


def paper_aux_coef(model_type: str | None) -> float:
    """The paper's load-balance coefficient for a base-model family (0.02 Mixtral, else 0.01)."""
    return PAPER_AUX_COEF.get(str(model_type), PAPER_AUX_COEF_DEFAULT)


def _f(default: Any, help: str, group: str, **extra: Any) -> Any:
    """A dataclass field carrying its CLI help text and group."""
    meta = {"help": help, "group": group, **extra}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainingConfig:
    """All settings of one fine-tuning run; defaults follow the paper where it says something."""

    # -- what to train on
    model: str | None = _f(None, "base model directory or hub name (an MoE causal LM)", "data and model")
    tokenizer: str | None = _f(None, "tokenizer path (default: the model's)", "data and model")
    data: str | None = _f(None, "training data: LLM-Adapters JSON list, JSONL, CSV or Parquet", "data and model")
    output: str | None = _f(None, "output directory (checkpoints, logs, final adapter)", "data and model")
    config: str | None = _f(None, "YAML file with any of these settings; flags override it", "data and model")
    model_dtype: str = _f("auto", "dtype of the frozen base model", "data and model", choices=MODEL_DTYPES)
    trust_remote_code: bool = _f(False, "allow the model's own Python code to run", "data and model")
    load_in_4bit: bool = _f(False, QUANTIZATION_HELP["load_in_4bit"], "data and model")
    load_in_8bit: bool = _f(False, QUANTIZATION_HELP["load_in_8bit"], "data and model")
    bnb_4bit_quant_type: str = _f("nf4", QUANTIZATION_HELP["bnb_4bit_quant_type"], "data and model",
                                  choices=QUANT_TYPES_4BIT)
    # -- method
    method: str = _f("perft", "perft, a PEFT LoRA baseline (lora-attn q,v / lora-experts), ESFT (esft-gate / "
                     "esft-token) or the hybrid perft+lora-attn", "method",
                     choices=_Registered(method_names))
    variant: str = _f("routed", "PERFT variant: routed (R), embedded (E), dense (D), single (S)", "method",
                      choices=_Registered(variant_names))
    adapter: str = _f("lora", "adapter expert kind (a registered kind: perft/adapter_kinds.py)", "method",
                      choices=_Registered(adapter_kinds))
    num_experts: int = _f(4, "adapter experts N (routed, dense)", "method")
    top_k: int = _f(2, "adapter experts per token K (routed)", "method")
    rank: int = _f(16, "adapter rank r (bottleneck width)", "method")
    alpha: float | None = _f(None, "LoRA alpha (default 2 x rank, as the paper)", "method")
    dropout: float = _f(0.05, "adapter dropout", "method")
    dropout_at: str | None = _f(None, "where adapter dropout applies: input, or hidden (after the down "
                                "projection, a mask per expert); default: the kind's own (lora input, parallel hidden)",
                                "method")
    dropout_masks: str = _f("shared", "input-site dropout masks: shared (one per block) or per_expert (one per "
                            "expert, slower; docs/training.md)", "method", choices=DROPOUT_MASKS)
    init: str = _f("normal", "initialisation of lora_A / adapter_down: normal (the released code's N(0, 2/r)) "
                   "or kaiming (PEFT's)", "method", choices=INIT_SCHEMES)
    activation: str = _f("silu", "activation of parallel adapters", "method", choices=ACTIVATIONS)
    normalize_top_k: bool | None = _f(None, "renormalise kept PERFT-R weights (default: as the base model)", "method")
    router_aux_loss_coef: float | None = _f(
        None, "PERFT-R router load-balance loss coefficient (default: the paper's for the base family, "
        "0.02 Mixtral, 0.01 otherwise; 0: off)", "method")
    base_router_aux_loss_coef: float | None = _f(
        None, "frozen base router's load-balance loss coefficient (default: the paper's for the base family, "
        "0.02 Mixtral, 0.01 otherwise, where the model has one; 0: off)", "method")
    layers: list[int] | None = _f(None, "MoE layer indices to adapt (default: all)", "method")
    esft_top_p: float = _f(0.2, "ESFT: per layer, train the fewest experts whose score shares sum to this",
                           "method")
    esft_sample_tokens: int = _f(8192, "ESFT: training tokens the frozen base is scored on", "method")
    lora_attn_rank: int | None = _f(None, "hybrid perft+lora-attn: LoRA rank on attention q,v (default: --rank)",
                                    "method")
    adapter_dtype: str = _f("float32", "adapter weight dtype", "method",
                            choices=("float32", "bfloat16", "float16", "auto"))
    # -- data
    cutoff_len: int = _f(256, "truncate prompt+response to this many tokens", "data")
    val_set_size: int = _f(120, "records held out for validation loss (0: none)", "data")
    split_seed: int = _f(42, "seed of the validation split", "data")
    train_on_inputs: bool = _f(True, "also train on prompt tokens, as the paper's runs do "
                               "(--no-train-on-inputs: response tokens only)", "data")
    prompt_style: str = _f("clean", "prompt template: clean (LLM-Adapters' Alpaca template without stray "
                           "whitespace) or released (the released code's exact training strings)", "data",
                           choices=PROMPT_STYLES)
    group_by_length: bool = _f(False, "group similar lengths into the same global batches (less padding)", "data")
    max_train_samples: int | None = _f(None, "use only the first N training records (quick runs)", "data")
    # -- optimisation
    epochs: float = _f(3.0, "training epochs", "optimisation")
    max_steps: int | None = _f(None, "stop after this many optimiser steps (overrides epochs)", "optimisation")
    lr: float = _f(1e-5, "peak learning rate (paper: 1e-5 OLMoE, 2e-5 Mixtral)", "optimisation")
    lr_scheduler: str = _f("linear", "learning-rate schedule after warm-up", "optimisation", choices=SCHEDULERS)
    warmup_steps: int = _f(100, "linear warm-up steps", "optimisation")
    weight_decay: float = _f(0.0, "AdamW weight decay", "optimisation")
    adam_beta1: float = _f(0.9, "AdamW beta1", "optimisation")
    adam_beta2: float = _f(0.999, "AdamW beta2", "optimisation")
    adam_epsilon: float = _f(1e-8, "AdamW epsilon", "optimisation")
    max_grad_norm: float = _f(1.0, "gradient clipping norm (0: off)", "optimisation")
    batch_size: int = _f(16, "global batch size (examples per optimiser step, all processes)", "optimisation")
    micro_batch_size: int | None = _f(None, "examples per forward pass per process (default: batch / processes)",
                                      "optimisation")
    seed: int = _f(42, "random seed (adapter init, data order, dropout)", "optimisation")
    bf16: str = _f("auto", "bf16 autocast: auto (where the hardware has it), true, false", "optimisation",
                   choices=PRECISIONS)
    gradient_checkpointing: bool = _f(False, "recompute activations in backward to save memory", "optimisation")
    # -- evaluation, checkpoints, logs
    eval_steps: int = _f(80, "validation loss every N steps", "evaluation and checkpoints")
    eval_batch_size: int | None = _f(None, "validation micro-batch size (default: micro_batch_size)",
                                     "evaluation and checkpoints")
    save_steps: int = _f(80, "checkpoint every N steps", "evaluation and checkpoints")
    save_total_limit: int | None = _f(3, "keep the last K checkpoints (the best is kept too)",
                                      "evaluation and checkpoints")
    load_best_at_end: bool = _f(True, "final adapter = best checkpoint by validation loss",
                                "evaluation and checkpoints")
    logging_steps: int = _f(10, "log train loss every N steps", "evaluation and checkpoints")
    report_to: str = _f("tensorboard", "tensorboard, wandb, both (comma-separated) or none",
                        "evaluation and checkpoints")
    wandb_project: str = _f("perft", "W&B project (with --report-to wandb)", "evaluation and checkpoints")
    run_name: str | None = _f(None, "run name for the logs", "evaluation and checkpoints")
    progress: bool = _f(True, "show a progress bar", "evaluation and checkpoints")
    resume: str | None = _f(None, "continue a run: 'latest' checkpoint in --output, 'auto' (latest if any), "
                            "or a checkpoint directory", "evaluation and checkpoints")
    overwrite_output_dir: bool = _f(False, "start over in an --output that already holds a run",
                                    "evaluation and checkpoints")
    # -- distributed
    strategy: str = _f("ddp", "multi-process strategy under torchrun: ddp, or fsdp for big models",
                       "distributed", choices=STRATEGIES)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> TrainingConfig:
        """Build from a mapping (YAML keys may use '-' or '_'); unknown keys are an error."""
        if not isinstance(data, dict):
            raise PerftError(f"{source} must be a mapping of settings, got {type(data).__name__}")
        data = translate_aliases(data, source)
        known = {f.name for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        for key, value in data.items():
            name = str(key).replace("-", "_")
            if name in TRANSFORMERS_INSTEAD:
                raise PerftError(f"{source} sets transformers' {name!r}, which perft does not take: "
                                 f"{TRANSFORMERS_INSTEAD[name]}")
            if name not in known:
                close = difflib.get_close_matches(name, sorted(known | set(TRANSFORMERS_ALIASES)), n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                raise PerftError(f"unknown setting {str(key)!r} in {source}{hint}; see `perft train --help`")
            values[name] = value
        cfg = cls(**values)
        cfg.normalise()
        return cfg

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: dict[str, Any] | None = None) -> TrainingConfig:
        """Load a YAML file, then apply `overrides` (e.g. command-line flags) on top."""
        data = translate_aliases(load_yaml(path), str(path))
        data.pop("config", None)
        data.update(overrides or {})
        data["config"] = str(path)
        return cls.from_dict(data, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def normalise(self) -> None:
        """Coerce YAML spellings (true/false for bf16, ints for floats) to canonical values."""
        if isinstance(self.bf16, bool):
            self.bf16 = "true" if self.bf16 else "false"
        if isinstance(self.bf16, str):
            self.bf16 = self.bf16.lower()
        for name in ("lr", "epochs", "weight_decay", "dropout", "router_aux_loss_coef", "max_grad_norm",
                     "adam_beta1", "adam_beta2", "adam_epsilon", "esft_top_p"):
            value = getattr(self, name)
            if isinstance(value, int) and not isinstance(value, bool):
                setattr(self, name, float(value))
            elif isinstance(value, str):  # YAML reads 1e-5 as a string
                try:
                    setattr(self, name, float(value))
                except ValueError:
                    raise PerftError(f"{name} must be a number, got {value!r}") from None

    # ------------------------------------------------------------------ validation
    def validate(self, world_size: int = 1) -> None:
        """Raise `PerftError` for the first impossible or missing setting, naming the fix."""
        for name in ("model", "data", "output", "tokenizer", "config", "run_name", "wandb_project", "report_to"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise PerftError(f"{name} must be text, got {value!r}")
            if isinstance(value, str) and "\x00" in value:
                raise PerftError(f"{name} contains a NUL character: {value!r}")
        for name in ("model", "data", "output"):
            if not getattr(self, name):
                raise PerftError(f"no --{name} given: set it on the command line or as '{name}:' in the YAML config")
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise PerftError(f"unknown {f.name} {getattr(self, f.name)!r}; choose one of: {', '.join(choices)}")
        expert_quantization(self.load_in_4bit, self.load_in_8bit, self.bnb_4bit_quant_type)
        for reporter in self.reporters:
            if reporter not in REPORTERS:
                raise PerftError(f"unknown report_to {reporter!r}; choose from {', '.join(REPORTERS)}")
        _int(self, "batch_size", 1)
        if self.micro_batch_size is not None:
            _int(self, "micro_batch_size", 1)
        micro = self.micro_batch_size_for(world_size)
        if micro > self.batch_size:
            raise PerftError(
                f"micro_batch_size={micro} is larger than batch_size={self.batch_size}: a step cannot hold "
                "fewer examples than one forward pass; lower --micro-batch-size or raise --batch-size"
            )
        if self.batch_size % (micro * world_size):
            raise PerftError(
                f"batch_size={self.batch_size} is not divisible by micro_batch_size={micro} x "
                f"{world_size} process(es); pick sizes with batch = micro x accumulation x processes"
            )
        for name, minimum in (("cutoff_len", 2), ("val_set_size", 0), ("warmup_steps", 0), ("eval_steps", 1),
                              ("save_steps", 1), ("logging_steps", 1)):
            _int(self, name, minimum)
        for name in ("split_seed", "seed"):  # numpy and torch take seeds of 32 bits
            _int(self, name, 0, maximum=MAX_SEED)
        for name in ("max_steps", "max_train_samples", "save_total_limit", "eval_batch_size"):
            if getattr(self, name) is not None:
                _int(self, name, 1)
        if self.layers is not None and not isinstance(self.layers, list):
            raise PerftError(f"layers must be a list of layer indices, got {self.layers!r}")
        _number(self, "lr", positive=True)
        _number(self, "epochs", positive=True)
        for name in ("weight_decay", "max_grad_norm", "adam_epsilon"):
            _number(self, name)
        for name in ("router_aux_loss_coef", "base_router_aux_loss_coef"):
            if getattr(self, name) is not None:
                _number(self, name)
        for name in ("adam_beta1", "adam_beta2"):
            _number(self, name)
            if not getattr(self, name) < 1:
                raise PerftError(f"{name} must be in [0, 1), got {getattr(self, name)!r}")
        self._validate_meaning()
        get_method(self.method).validate(self)
        if self.load_best_at_end and self.val_set_size > 0 and self.save_steps % self.eval_steps:
            raise PerftError(
                f"save_steps={self.save_steps} is not a multiple of eval_steps={self.eval_steps}: the best "
                "checkpoint by validation loss might never be saved; align them or pass --no-load-best-at-end"
            )
        if self.resume is not None and not isinstance(self.resume, str):
            raise PerftError(f"resume must be 'latest', 'auto' or a checkpoint directory, got {self.resume!r}")

    def _validate_meaning(self) -> None:
        """Issue 15: values that pass their type but mean nothing (an adapter that can never change the
        model, a step count no run reaches, a division by zero in AdamW)."""
        if self.alpha is not None:
            _number(self, "alpha", positive=True)  # alpha 0: the adapter's output is multiplied by 0
        if not isinstance(self.dropout, (int, float)) or isinstance(self.dropout, bool) or not 0 <= self.dropout < 1:
            raise PerftError(f"dropout must be a number in [0, 1), got {self.dropout!r}")
        _number(self, "adam_epsilon", positive=True)  # eps 0 divides by zero where a moment is 0
        if self.epochs > MAX_EPOCHS:
            raise PerftError(f"epochs must be <= {MAX_EPOCHS}, got {self.epochs!r}; use --max-steps for a step count")
        if self.lr > 10:
            raise PerftError(f"lr {self.lr!r} is far outside any useful learning rate: pass a value <= 10")

    # ------------------------------------------------------------------ derived values
    @property
    def reporters(self) -> list[str]:
        names = [r.strip().lower() for r in str(self.report_to).split(",") if r.strip()]
        return [] if names in ([], ["none"]) else names

    def micro_batch_size_for(self, world_size: int) -> int:
        if self.micro_batch_size is not None:
            return self.micro_batch_size
        return max(1, self.batch_size // max(world_size, 1))

    def grad_accumulation(self, world_size: int) -> int:
        return self.batch_size // (self.micro_batch_size_for(world_size) * world_size)

    def apply_family_defaults(self, model_type: str | None, has_router_loss: bool) -> None:
        """Fill the unset balance-loss coefficients with the paper's for this base family.

        The base router's loss is left off for a model that has none (no `output_router_logits`).
        """
        coef = paper_aux_coef(model_type)
        if self.router_aux_loss_coef is None:
            self.router_aux_loss_coef = coef
        if self.base_router_aux_loss_coef is None and has_router_loss:
            self.base_router_aux_loss_coef = coef

    def perft_config(self) -> PerftConfig:
        """The PERFT adapter part of this run (validated by `PerftConfig`); an unset balance-loss
        coefficient (before `apply_family_defaults`) counts as the paper's default 0.01."""
        aux = PAPER_AUX_COEF_DEFAULT if self.router_aux_loss_coef is None else self.router_aux_loss_coef
        return PerftConfig(
            variant=self.variant, adapter=self.adapter, num_experts=self.num_experts, top_k=self.top_k,
            rank=self.rank, alpha=self.alpha, dropout=self.dropout, init=self.init, dropout_at=self.dropout_at,
            dropout_masks=self.dropout_masks,
            activation=self.activation, normalize_top_k=self.normalize_top_k, router_aux_loss_coef=aux,
            layers=self.layers, adapter_dtype=self.adapter_dtype,
        )

    def fingerprint(self) -> dict[str, Any]:
        """The settings a resumed run must share with the run that wrote the checkpoint."""
        data = {k: v for k, v in self.to_dict().items() if k not in RESUMABLE_CHANGES and k != "data"}
        from perft.fingerprint import base_fingerprint

        model = Path(str(self.model)).expanduser()  # by content: a moved copy resumes, a changed one does not
        data["model"] = base_fingerprint(model) or (str(model.resolve()) if model.exists() else str(self.model))
        if self.tokenizer:
            tok = Path(self.tokenizer).expanduser()
            data["tokenizer"] = str(tok.resolve()) if tok.exists() else self.tokenizer
        return data


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file into a dict, with one-line errors."""
    import yaml

    path = Path(path)
    if path.is_dir():
        raise PerftError(f"config file {path} is a directory: give the YAML file itself")
    if not path.is_file():
        raise PerftError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise PerftError(f"config file {path} is not UTF-8 text") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise PerftError(f"config file {path} is not valid YAML{where}: {getattr(err, 'problem', err)}") from None
    except (ValueError, RecursionError) as err:  # e.g. a 5000-digit number, or lists nested thousands deep
        raise PerftError(f"config file {path} is not a usable YAML config: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise PerftError(f"config file {path} must hold a mapping of settings, got {type(data).__name__}")
    return data


MAX_EPOCHS = 1_000_000

def _int(cfg: TrainingConfig, name: str, minimum: int, maximum: int = MAX_INT) -> None:
    value = getattr(cfg, name)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise PerftError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if value > maximum:
        raise PerftError(f"{name} must be an integer <= {maximum}, got {value!r}")


def _number(cfg: TrainingConfig, name: str, positive: bool = False) -> None:
    value = getattr(cfg, name)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > 0 if positive else value >= 0)
    if not ok:
        raise PerftError(f"{name} must be a finite number {'> 0' if positive else '>= 0'}, got {value!r}")
