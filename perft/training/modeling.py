"""The model of a training run: the frozen base, its router settings, the method's adapters."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from perft.data.dataset import PreparedData
from perft.errors import PerftError
from perft.methods import get_method
from perft.training.args import TrainingConfig
from perft.training.distributed import DistributedContext


def preflight_model(cfg: TrainingConfig) -> None:
    """Fail fast on a model that cannot be adapted: read its config, build it on the meta device."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from perft.loading import check_local_path, first_line

    check_local_path(str(cfg.model))
    try:
        config = AutoConfig.from_pretrained(cfg.model, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as err:
        raise PerftError(f"cannot read the config of model {cfg.model!r}: {first_line(err)}") from None
    cfg.apply_family_defaults(getattr(config, "model_type", None), hasattr(config, "output_router_logits"))
    try:
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.trust_remote_code)
    except Exception:  # noqa: BLE001 - an exotic model: the real load below reports its own errors
        return
    get_method(cfg.method).preflight(skeleton, cfg)


@dataclass
class BuiltModel:
    """The model to train and how its frozen base's router loss is requested."""

    model: nn.Module
    base_aux_coef: float  # coefficient of the base router's balance loss in force (0: off)
    pass_router_flag: bool  # the base takes `output_router_logits`


def build_model(cfg: TrainingConfig, ctx: DistributedContext, resume_from: Path | None) -> BuiltModel:
    """Load the frozen base, attach the method's adapters (restored from `resume_from`), place it."""
    from transformers import set_seed

    from perft.loading import load_base_model
    from perft.training import checkpoint as ckpt

    set_seed(cfg.seed)
    base = load_base_model(str(cfg.model), dtype=cfg.model_dtype, trust_remote_code=cfg.trust_remote_code,
                           load_in_4bit=cfg.load_in_4bit, load_in_8bit=cfg.load_in_8bit,
                           bnb_4bit_quant_type=cfg.bnb_4bit_quant_type)
    base_aux_coef = configure_base_router_loss(base, cfg.base_router_aux_loss_coef)
    pass_router_flag = hasattr(getattr(base, "config", None), "output_router_logits")
    if hasattr(base, "config"):
        base.config.use_cache = False
    model = get_method(cfg.method).build(base, cfg)
    if resume_from is not None:
        ckpt.load_adapter_weights(model, resume_from)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.strategy != "fsdp" or not ctx.distributed:
        model.to(ctx.device)
    return BuiltModel(model, base_aux_coef, pass_router_flag)


def configure_base_router_loss(base: nn.Module, coef: float | None) -> float:
    """Turn the frozen base router's load-balance loss on/off; returns the coefficient in force."""
    config = getattr(base, "config", None)
    if config is None or not hasattr(config, "output_router_logits"):
        if coef:
            raise PerftError("this model has no router load-balance loss (no output_router_logits in its config): "
                             "unset base_router_aux_loss_coef")
        return 0.0
    if coef is not None:
        config.output_router_logits = coef > 0
        config.router_aux_loss_coef = coef
        if hasattr(base, "router_aux_loss_coef"):
            base.router_aux_loss_coef = coef  # models copy it at construction
    if not config.output_router_logits:
        return 0.0
    return float(getattr(config, "router_aux_loss_coef", 0.0) or 0.0)


def resolve_bf16(setting: str, device: torch.device) -> bool:
    if setting == "true":
        return True
    if setting == "false":
        return False
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, all) parameters of the model being trained. A trainable parameter that aliases part
    of a frozen one (ESFT's expert rows) counts once in "all"."""
    params = list(model.parameters())
    aliases = sum(p.numel() for p in params if getattr(p, "aliases_frozen", False))
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params) - aliases


def describe_run(cfg: TrainingConfig, ctx: DistributedContext, data: PreparedData, *, trainable: int, total: int,
                 micro: int, steps: tuple[int, int], bf16: bool) -> list[str]:
    """The lines `perft train` prints (and sends to TensorBoard) when a run starts."""
    total_steps, steps_per_epoch = steps
    return [
        f"perft train: {get_method(cfg.method).describe(cfg)} on {cfg.model}",
        f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}",
        f"data: {len(data.train):,d} train / {len(data.val) if data.val is not None else 0:,d} val "
        f"records ({data.truncated} cut at {cfg.cutoff_len} tokens"
        + (f", {data.no_target} with no response token left" if data.no_target else "") + ")",
        f"steps: {total_steps} ({steps_per_epoch}/epoch); batch {cfg.batch_size} = micro {micro} x "
        f"accumulation {cfg.grad_accumulation(ctx.world_size)} x {ctx.world_size} process(es); device "
        f"{ctx.device}{', bf16 autocast' if bf16 else ''}" + (f"; {cfg.strategy}" if ctx.distributed else ""),
    ]


def check_token_ids(model: nn.Module, data: PreparedData, tokenizer: str) -> None:
    """Every token id of the data has a row in the model's embedding (issue 15: an IndexError otherwise)."""
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    rows = getattr(embedding, "num_embeddings", None)
    if not rows:
        return
    splits = [data.train] + ([data.val] if data.val is not None else [])
    biggest = max((max(ids) for split in splits for ids in split["input_ids"] if len(ids)), default=-1)
    if biggest >= rows:
        raise PerftError(
            f"the tokenizer of {tokenizer} produced token id {biggest}, but the model's embedding has only {rows} "
            "tokens: use the tokenizer the model was trained with (or resize the model's embeddings first)"
        )
