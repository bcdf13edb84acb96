"""The `perft train` loop: the paper's recipe (AdamW, linear warm-up/decay, clipping, bf16,
best checkpoint by validation loss), on one process or many, resumable bit-for-bit.

Loss normalisation. The cross-entropy of a step is summed over the response tokens of the
whole global batch and divided by their number, which every process computes from the
shared batch plan. Gradients therefore do not depend on how the global batch is cut into
micro-batches or processes, and a 2-process run matches a 1-process run with the same
global batch. The load-balance losses (frozen base router, PERFT-R router) are averaged
over the micro-batches of the step, as `transformers` computes them per forward pass.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from perft.data.collate import (
    PaddingCollator,
    epoch_order,
    global_batches,
    micro_batches_for_rank,
    num_micro_batches,
)
from perft.data.dataset import IGNORE_INDEX, PreparedData, prepare_data
from perft.errors import PerftError
from perft.io import atomic_write_text, check_writable_dir, load_safetensors
from perft.training import checkpoint as ckpt
from perft.training.args import TrainingConfig
from perft.training.distributed import (
    DistributedContext,
    average_gradients,
    init_distributed,
    no_sync,
    unwrap,
    wrap_model,
)

ADAPTER_DIR = "adapter"
METRICS_NAME = "metrics.jsonl"
LENGTH_GROUP_MULTIPLIER = 50  # as transformers' LengthGroupedSampler
# Called after every optimiser step with {"step", "loss", "lr", "checkpoint" (path or None), "model"}.
Callback = Callable[[dict[str, Any]], None]


class NonFiniteLoss(PerftError):
    """The loss or gradient became NaN/Inf; the run stopped before applying that step."""


@dataclass
class TrainResult:
    """What a run did, for scripts and tests."""

    output_dir: Path
    adapter_dir: Path | None
    status: str  # "completed" or "interrupted"
    global_step: int
    total_steps: int
    best_step: int | None = None
    best_val_loss: float | None = None
    signal: int | None = None
    history: list[dict[str, Any]] = field(default_factory=list)


def train(config: TrainingConfig, *, callbacks: Sequence[Callback] = ()) -> TrainResult:
    """Run one fine-tuning job described by `config` (also under torchrun / accelerate launch)."""
    ctx = init_distributed()
    try:
        return Trainer(config, ctx, callbacks).run()
    finally:
        ctx.close()


# ---------------------------------------------------------------------------- model building
def preflight_model(cfg: TrainingConfig) -> None:
    """Fail fast on a model that cannot be adapted: read its config, build it on the meta device."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from perft.arch import require_moe_blocks
    from perft.loading import check_local_path
    from perft.model import get_perft_model

    check_local_path(str(cfg.model))
    try:
        config = AutoConfig.from_pretrained(cfg.model, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as err:
        from perft.loading import first_line

        raise PerftError(f"cannot read the config of model {cfg.model!r}: {first_line(err)}") from None
    try:
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.trust_remote_code)
    except Exception:  # noqa: BLE001 - an exotic model: the real load below reports its own errors
        return
    if cfg.method != "lora-attn":
        require_moe_blocks(skeleton)
    if cfg.method == "perft":
        get_perft_model(skeleton, cfg.perft_config())


def build_model(cfg: TrainingConfig, base: nn.Module) -> nn.Module:
    """Attach the adapters `cfg.method` asks for (PERFT, or a PEFT LoRA baseline)."""
    if cfg.method == "perft":
        from perft.model import get_perft_model

        return get_perft_model(base, cfg.perft_config())
    from perft.baselines import get_lora_baseline

    target = "attention" if cfg.method == "lora-attn" else "experts"
    return get_lora_baseline(base, target, rank=cfg.rank, alpha=cfg.alpha, dropout=cfg.dropout)


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


# ---------------------------------------------------------------------------- the trainer
class Trainer:
    """One run. Construct, then `run()`; every check happens before anything is written."""

    def __init__(self, cfg: TrainingConfig, ctx: DistributedContext, callbacks: Sequence[Callback] = ()) -> None:
        self.cfg = cfg
        self.ctx = ctx
        self.callbacks = list(callbacks)
        self.out = Path(str(cfg.output))
        self.history: list[dict[str, Any]] = []
        self.best_val: float | None = None
        self.best_step: int | None = None
        self._signal: int | None = None
        self._bar: Any = None
        self._writers: list[Any] = []

    # ------------------------------------------------------------------ setup
    def _check_output_and_resume(self) -> Path | None:
        cfg = self.cfg
        if self.out.exists() and not self.out.is_dir():
            raise PerftError(f"output {self.out} exists and is not a directory: pick another --output")
        check_writable_dir(self.out)
        existing = ckpt.list_checkpoints(self.out)
        if cfg.resume is None:
            has_run = existing or (self.out / ADAPTER_DIR).exists()
            if has_run and not cfg.overwrite_output_dir:
                what = existing[-1][1].name if existing else ADAPTER_DIR
                raise PerftError(
                    f"output {self.out} already holds a run ({what}): pass --resume to continue it, "
                    "--overwrite-output-dir to start over, or pick another --output"
                )
            return None
        if cfg.resume in ("latest", "auto"):
            if existing:
                return existing[-1][1]
            if cfg.resume == "auto":
                return None
            raise PerftError(f"--resume: no checkpoint in {self.out} to resume from; drop --resume to start a new run")
        path = Path(cfg.resume)
        if not path.is_dir():
            raise PerftError(f"--resume: checkpoint directory {path} does not exist")
        return path

    def _check_resume_matches(self, checkpoint: Path, data_hash: str) -> dict[str, Any]:
        state = ckpt.read_state(checkpoint)
        saved, now = state.get("fingerprint", {}), self.cfg.fingerprint()
        changed = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
        if changed:
            diffs = ", ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in changed[:4])
            raise PerftError(
                f"cannot resume from {checkpoint}: it was written by another config ({diffs}); resume with the "
                "same settings, or start a new run in another --output"
            )
        if state.get("data_hash") != data_hash:
            raise PerftError(
                f"cannot resume from {checkpoint}: the data file {self.cfg.data} changed since the checkpoint was "
                "written; restore it, or start a new run in another --output"
            )
        return state

    def _load_tokenizer(self) -> Any:
        from perft.loading import load_tokenizer

        return load_tokenizer(self.cfg.tokenizer or str(self.cfg.model), trust_remote_code=self.cfg.trust_remote_code)

    def _reporters(self) -> None:
        if "wandb" in self.cfg.reporters:
            try:
                import wandb  # noqa: F401
            except ImportError:
                raise PerftError("--report-to wandb needs the wandb package: pip install wandb, "
                                 "or use --report-to tensorboard") from None

    # ------------------------------------------------------------------ run
    def run(self) -> TrainResult:
        cfg, ctx = self.cfg, self.ctx
        cfg.normalise()
        cfg.validate(ctx.world_size)
        self._reporters()
        resume_from = self._check_output_and_resume()
        if ctx.distributed:  # every process must continue from the same place (checkpoints on a shared disk)
            chosen = ctx.broadcast_object(str(resume_from) if resume_from else None)
            if ctx.any(chosen != (str(resume_from) if resume_from else None)):
                raise PerftError(
                    f"the processes disagree on the checkpoint to resume from (rank 0: {chosen}); put --output on "
                    "a file system that every node sees"
                )
        preflight_model(cfg)
        tokenizer = self._load_tokenizer()
        data = prepare_data(cfg.data, tokenizer, cutoff_len=cfg.cutoff_len, val_set_size=cfg.val_set_size,
                            split_seed=cfg.split_seed, train_on_inputs=cfg.train_on_inputs,
                            max_train_samples=cfg.max_train_samples)
        resume_state = self._check_resume_matches(resume_from, data.data_hash) if resume_from else None

        from transformers import set_seed

        from perft.loading import load_base_model

        set_seed(cfg.seed)
        base = load_base_model(str(cfg.model), dtype=cfg.model_dtype, trust_remote_code=cfg.trust_remote_code,
                               load_in_4bit=cfg.load_in_4bit, load_in_8bit=cfg.load_in_8bit,
                               bnb_4bit_quant_type=cfg.bnb_4bit_quant_type)
        self.base_aux_coef = configure_base_router_loss(base, cfg.base_router_aux_loss_coef)
        self.pass_router_flag = hasattr(getattr(base, "config", None), "output_router_logits")
        if hasattr(base, "config"):
            base.config.use_cache = False
        model = build_model(cfg, base)
        if resume_from is not None:
            weights = ckpt.adapter_weights_file(resume_from)
            ckpt.load_adapter_state(model, load_safetensors(weights), source=str(weights))
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if cfg.strategy != "fsdp" or not ctx.distributed:
            model.to(ctx.device)

        try:
            return self._train(model, tokenizer, data, resume_from, resume_state)
        finally:
            self._close_writers()

    def _prepare_output(self, resume_state: dict[str, Any] | None) -> None:
        try:
            self._write_output_start(resume_state)
        except OSError as err:  # e.g. read-only for root (immutable), or a full disk
            where = f" ({err.filename})" if err.filename else ""
            raise PerftError(f"cannot write to output {self.out}: {err.strerror or err}{where}; "
                             "pick another --output") from None

    def _write_output_start(self, resume_state: dict[str, Any] | None) -> None:
        import yaml

        self.out.mkdir(parents=True, exist_ok=True)
        ckpt.remove_stale_temporaries(self.out)
        if resume_state is None and self.cfg.overwrite_output_dir:
            for _, path in ckpt.list_checkpoints(self.out):
                ckpt.remove_dir(path)  # never a torn checkpoint-N left by a kill
            for name in (ADAPTER_DIR, "train_summary.json"):
                target = self.out / name
                if target.is_dir() and not target.is_symlink():
                    ckpt.remove_dir(target)
                elif target.exists() or target.is_symlink():
                    target.unlink()
        metrics = self.out / METRICS_NAME
        if resume_state is None and (metrics.exists() or metrics.is_symlink()):
            metrics.unlink()  # left by a run killed before its first checkpoint: not this run's
        saved = {**self.cfg.to_dict(), "resume": None, "overwrite_output_dir": False}  # rerunning it starts no surprise
        atomic_write_text(self.out / "training_config.yaml", yaml.safe_dump(saved, sort_keys=False))
        metrics = self.out / METRICS_NAME
        if resume_state is not None and metrics.exists():  # drop what the killed run logged after its checkpoint
            step = resume_state["global_step"]
            keep = []
            for line in metrics.read_text(encoding="utf-8").splitlines():
                try:
                    if json.loads(line).get("step", 0) <= step:
                        keep.append(line)
                except json.JSONDecodeError:  # a line torn by the kill
                    continue
            atomic_write_text(metrics, "".join(line + "\n" for line in keep))

    # ------------------------------------------------------------------ the loop
    def _train(self, model: nn.Module, tokenizer: Any, data: PreparedData, resume_from: Path | None,
               resume_state: dict[str, Any] | None) -> TrainResult:
        from transformers import get_scheduler

        cfg, ctx = self.cfg, self.ctx
        self.model = model
        self.collate = PaddingCollator(tokenizer.pad_token_id)
        self.train_ds, self.val_ds = data.train, data.val
        self.lengths = list(data.train["length"])
        self.targets = list(data.train["num_targets"])
        self.micro = cfg.micro_batch_size_for(ctx.world_size)
        self.use_bf16 = resolve_bf16(cfg.bf16, ctx.device)
        n_train = len(self.train_ds)
        steps_per_epoch = math.ceil(n_train / cfg.batch_size)
        total_steps = cfg.max_steps or math.ceil(cfg.epochs * steps_per_epoch)

        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.param_names = [n for n, _ in named]
        self.params = [p for _, p in named]
        optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                      eps=cfg.adam_epsilon, weight_decay=cfg.weight_decay)
        scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.warmup_steps,
                                  num_training_steps=total_steps)
        self.wrapped = wrap_model(model, ctx, cfg.strategy)

        step = 0
        if resume_state is not None:
            assert resume_from is not None
            ckpt.load_training_state(resume_from, model=model, optimizer=optimizer, param_names=self.param_names,
                                     scheduler=scheduler, ctx=ctx)
            step = int(resume_state["global_step"])
            self.best_val, self.best_step = resume_state.get("best_val_loss"), resume_state.get("best_step")
            self.history = list(resume_state.get("history", []))

        # Everything is checked, the checkpoint's training state included: from here on the
        # output directory may change.
        if ctx.is_main:
            self._prepare_output(resume_state)
        ctx.barrier()

        self._open_writers(step)
        self._report_start(data, total_steps, steps_per_epoch, resumed_at=step if resume_from else None)
        if resume_state is None and self.val_ds is not None:
            self._evaluate(0)
        elif resume_state is None:
            self._log_router_start()

        last_saved = step if resume_from else -1
        window: dict[str, float] = {"loss": 0.0, "aux": 0.0, "steps": 0, "tokens": 0.0, "time": 0.0}
        from tqdm.auto import tqdm

        self._bar = tqdm(total=total_steps, initial=step, disable=not (ctx.is_main and cfg.progress),
                         dynamic_ncols=True, unit="step", desc="train")
        previous_handlers = self._install_signal_handlers()
        order_epoch, batches = -1, []
        try:
            while step < total_steps:
                epoch, index = divmod(step, steps_per_epoch)
                if epoch != order_epoch:
                    order = epoch_order(n_train, seed=cfg.seed, epoch=epoch, lengths=self.lengths,
                                        group_size=cfg.batch_size * LENGTH_GROUP_MULTIPLIER if cfg.group_by_length
                                        else 0)
                    batches, order_epoch = global_batches(order, cfg.batch_size), epoch
                started = time.perf_counter()
                stats = self._train_step(batches[index], step)
                lr = optimizer.param_groups[0]["lr"]
                if not (math.isfinite(stats["loss"]) and math.isfinite(stats["aux"])
                        and math.isfinite(stats["grad_norm"])):
                    raise self._non_finite(step + 1, stats)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                ckpt.fault_point("step", step)
                elapsed = time.perf_counter() - started
                for key in ("loss", "aux"):
                    window[key] += stats[key]
                window["steps"] += 1
                window["tokens"] += stats["tokens"]
                window["time"] += elapsed
                self._bar.update(1)
                self._bar.set_postfix(loss=f"{stats['loss']:.4f}", lr=f"{lr:.2e}",
                                      tok_s=f"{stats['tokens'] / max(elapsed, 1e-9):.0f}", refresh=False)
                if step % cfg.logging_steps == 0 or step == total_steps:
                    self._log_train(step, steps_per_epoch, window, lr, stats["grad_norm"])
                    window = {"loss": 0.0, "aux": 0.0, "steps": 0, "tokens": 0.0, "time": 0.0}
                if self.val_ds is not None and (step % cfg.eval_steps == 0 or step == total_steps):
                    self._evaluate(step)
                saved = None
                if step % cfg.save_steps == 0 or step == total_steps:
                    saved = self._save(step, steps_per_epoch, optimizer, scheduler, data)
                    last_saved = step
                for callback in self.callbacks:
                    callback({"step": step, "loss": stats["loss"], "lr": lr, "checkpoint": saved,
                              "model": unwrap(self.model)})
                if ctx.any(self._signal is not None):
                    if last_saved != step:
                        self._save(step, steps_per_epoch, optimizer, scheduler, data)
                    return self._finish(step, total_steps, "interrupted")
        finally:
            self._restore_signal_handlers(previous_handlers)
            self._bar.close()
        return self._finish(step, total_steps, "completed")

    def _autocast(self) -> Any:
        if not self.use_bf16:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.ctx.device.type, dtype=torch.bfloat16)

    def _forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """(cross-entropy summed over target tokens, weighted balance losses, outputs)."""
        kwargs: dict[str, Any] = {}
        if self.pass_router_flag:
            kwargs["output_router_logits"] = self.base_aux_coef > 0
        with self._autocast():
            out = self.wrapped(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kwargs)
        logits = out.logits[:, :-1, :]
        targets = batch["labels"][:, 1:]
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                             ignore_index=IGNORE_INDEX, reduction="sum")
        aux = ce.new_zeros(())
        if self.base_aux_coef > 0 and getattr(out, "aux_loss", None) is not None:
            aux = aux + self.base_aux_coef * out.aux_loss.float()
        perft_aux = out.get("perft_aux_loss") if hasattr(out, "get") else None
        if perft_aux is not None:
            aux = aux + self.cfg.router_aux_loss_coef * perft_aux.float()
        return ce, aux, out

    def _examples(self, indices: Sequence[int], ds: Any) -> dict[str, torch.Tensor]:
        rows = ds[list(indices)]
        examples = [{"input_ids": i, "labels": lab} for i, lab in zip(rows["input_ids"], rows["labels"])]
        batch = self.collate(examples)
        return {k: v.to(self.ctx.device) for k, v in batch.items()}

    def _train_step(self, batch_indices: list[int], step: int) -> dict[str, float]:
        """Forward/backward over this process's micro-batches of one global batch; no optimiser step."""
        cfg, ctx = self.cfg, self.ctx
        self.wrapped.train()
        ordered = sorted(batch_indices, key=lambda i: -self.lengths[i])  # similar lengths share a micro-batch
        micro = micro_batches_for_rank(ordered, self.micro, ctx.rank, ctx.world_size)
        n_micro = num_micro_batches(len(ordered), self.micro)
        per_rank = math.ceil(n_micro / ctx.world_size)  # every process runs as many passes (FSDP needs it)
        denominator = max(sum(self.targets[i] for i in ordered), 1)
        ce_sum = aux_sum = tokens = 0.0
        record = self._routed_layers()
        for j in range(per_rank):
            real = j < len(micro)
            batch = self._examples(micro[j] if real else ordered[:1], self.train_ds)
            last = j == per_rank - 1
            with no_sync(self.wrapped, enabled=not last):
                for layer in record.values():
                    layer.record_routing = real
                ce, aux, _ = self._forward(batch)
                if real:
                    self._count_routing(record, batch["attention_mask"])
                loss = ce * (ctx.world_size / denominator) + aux * (ctx.world_size / n_micro)
                (loss if real else loss * 0.0).backward()
            for layer in record.values():
                layer.record_routing = False
            if real:
                ce_sum += ce.item()
                aux_sum += aux.item()
                tokens += float(batch["attention_mask"].sum())
        if cfg.strategy == "fsdp" and ctx.distributed:
            average_gradients(self.params, ctx)
        ce_sum, aux_sum, tokens = ctx.all_reduce_sum([ce_sum, aux_sum, tokens])
        if cfg.max_grad_norm > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm)
        else:
            grad_norm = torch.linalg.vector_norm(
                torch.stack([p.grad.detach().float().norm() for p in self.params if p.grad is not None]))
        return {"loss": ce_sum / denominator, "aux": aux_sum / n_micro, "tokens": tokens,
                "grad_norm": float(grad_norm)}

    # ------------------------------------------------------------------ router figures
    def _routed_layers(self) -> dict[str, Any]:
        layers = getattr(unwrap(self.model), "perft_layers", None)
        if not layers:
            return {}
        return {path: layer for path, layer in layers.items() if getattr(layer, "variant", None) == "routed"}

    def _count_routing(self, layers: dict[str, Any], mask: torch.Tensor) -> None:
        counts = getattr(self, "_route_counts", None)
        if counts is None:
            counts = self._route_counts = {}
        keep = mask.reshape(-1).bool()
        for path, layer in layers.items():
            routing = layer.last_routing
            if routing is None:
                continue
            index = routing["index"]
            if index.shape[0] == keep.shape[0]:
                index = index[keep]
            c = torch.bincount(index.reshape(-1).cpu(), minlength=layer.num_experts).double()
            counts[path] = counts.get(path, torch.zeros_like(c)) + c
            layer.last_routing = None

    def _take_router_load(self) -> dict[str, list[float]] | None:
        """Share of top-K routing slots per PERFT-R adapter expert, per layer, since the last call."""
        counts = getattr(self, "_route_counts", None)
        layers = self._routed_layers()
        if not layers:
            return None
        self._route_counts = {}
        paths = sorted(layers)
        n = max(layer.num_experts for layer in layers.values())
        flat = [0.0] * (len(paths) * n)
        for i, path in enumerate(paths):
            if counts and path in counts:
                flat[i * n:i * n + len(counts[path])] = counts[path].tolist()
        flat = self.ctx.all_reduce_sum(flat)
        loads = {}
        for i, path in enumerate(paths):
            row = flat[i * n:(i + 1) * n][:layers[path].num_experts]
            total = sum(row)
            if total > 0:
                loads[path] = [c / total for c in row]
        return loads or None

    @staticmethod
    def router_summary(loads: dict[str, list[float]]) -> dict[str, float]:
        """max load x N (1 = perfectly balanced) and coefficient of variation, averaged over layers."""
        ratios, cvs = [], []
        for row in loads.values():
            n = len(row)
            mean = 1.0 / n
            ratios.append(max(row) * n)
            cvs.append(math.sqrt(sum((x - mean) ** 2 for x in row) / n) / mean)
        return {"max_load_x_n": sum(ratios) / len(ratios), "load_cv": sum(cvs) / len(cvs)}

    def _format_router(self, loads: dict[str, list[float]]) -> str:
        summary = self.router_summary(loads)
        n = len(next(iter(loads.values())))
        lines = [f"PERFT-R router load (share of top-K slots per adapter expert; balanced = {1 / n:.3f}): "
                 f"max x N {summary['max_load_x_n']:.2f}, CV {summary['load_cv']:.2f}"]
        rows = list(loads.items())
        shown = rows if len(rows) <= 8 else rows[:4] + rows[-4:]
        for path, row in shown:
            lines.append(f"  {path}: " + " ".join(f"{x:.3f}" for x in row))
        if len(rows) > len(shown):
            lines.insert(5, f"  ... {len(rows) - len(shown)} more layers in {METRICS_NAME}")
        return "\n".join(lines)

    def _log_router_start(self) -> None:
        """Without a validation set: router figures of the first training batch, before any update."""
        layers = self._routed_layers()
        if not layers:
            return
        first = list(range(min(len(self.train_ds), self.micro)))
        self.wrapped.eval()
        with torch.no_grad():
            for layer in layers.values():
                layer.record_routing = True
            batch = self._examples(first, self.train_ds)
            self._forward(batch)
            self._count_routing(layers, batch["attention_mask"])
            for layer in layers.values():
                layer.record_routing = False
        loads = self._take_router_load()
        if loads:
            self._emit({"step": 0, "router_load": loads, **{f"router_{k}": v for k, v in
                                                            self.router_summary(loads).items()}})
            self._print(self._format_router(loads))

    # ------------------------------------------------------------------ evaluation
    def _evaluate(self, step: int) -> float:
        """Mean cross-entropy per target token over the validation set (+ router load over it)."""
        ctx = self.ctx
        size = self.cfg.eval_batch_size or self.micro
        val_lengths = list(self.val_ds["length"])
        order = sorted(range(len(self.val_ds)), key=lambda i: -val_lengths[i])
        chunks = [order[i:i + size] for i in range(0, len(order), size)]
        mine = chunks[ctx.rank::ctx.world_size]
        rounds = math.ceil(len(chunks) / ctx.world_size)
        layers = self._routed_layers()
        saved_counts, self._route_counts = getattr(self, "_route_counts", None), {}
        ce_sum = count = 0.0
        self.wrapped.eval()
        with torch.no_grad():
            for j in range(rounds):
                real = j < len(mine)
                batch = self._examples(mine[j] if real else chunks[0], self.val_ds)
                for layer in layers.values():
                    layer.record_routing = real
                ce, _, _ = self._forward(batch)
                if real:
                    self._count_routing(layers, batch["attention_mask"])
                    ce_sum += ce.item()
                    count += float((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
                for layer in layers.values():
                    layer.record_routing = False
        ce_sum, count = ctx.all_reduce_sum([ce_sum, count])
        val_loss = ce_sum / max(count, 1.0)
        loads = self._take_router_load()
        self._route_counts = saved_counts or {}
        record: dict[str, Any] = {"step": step, "val_loss": val_loss}
        if loads:
            record.update({f"router_{k}": v for k, v in self.router_summary(loads).items()}, router_load=loads)
        if count == 0:  # no response token survived the cutoff in any validation example
            val_loss = float("nan")
        ckpt.fault_point("eval", step)
        improved = count > 0 and (self.best_val is None or val_loss < self.best_val)
        if step > 0 and improved:
            self.best_val, self.best_step = val_loss, step
        self._emit(record)
        message = f"step {step}: val_loss {val_loss:.4f}" + (" (best)" if step > 0 and improved else "")
        if loads and step == 0:
            message += "\n" + self._format_router(loads)
        elif loads:
            message += f", router max x N {record['router_max_load_x_n']:.2f}"
        self._print(message)
        return val_loss

    # ------------------------------------------------------------------ checkpoints
    def _save(self, step: int, steps_per_epoch: int, optimizer: torch.optim.Optimizer, scheduler: Any,
              data: PreparedData) -> Path:
        state = {
            "global_step": step,
            "epoch": step // steps_per_epoch,
            "step_in_epoch": step % steps_per_epoch,
            "examples_seen": step * self.cfg.batch_size,
            "best_val_loss": self.best_val,
            "best_step": self.best_step,
            "history": self.history,
            "fingerprint": self.cfg.fingerprint(),
            "data_hash": data.data_hash,
            "world_size": self.ctx.world_size,
            "method": self.cfg.method,
        }
        path = ckpt.save_checkpoint(self.out, step, model=unwrap(self.model), optimizer=optimizer,
                                    param_names=self.param_names, scheduler=scheduler, state=state, ctx=self.ctx)
        if self.ctx.is_main:
            protect = {self.best_step} if self.best_step is not None else set()
            ckpt.rotate_checkpoints(self.out, self.cfg.save_total_limit, protect, step=step)
        self.ctx.barrier()
        return path

    def _non_finite(self, step: int, stats: dict[str, float]) -> NonFiniteLoss:
        existing = ckpt.list_checkpoints(self.out)
        keep = (f"the last good checkpoint is {existing[-1][1]} (step {existing[-1][0]})" if existing
                else "no checkpoint was written yet")
        if not math.isfinite(stats["loss"]):
            what, value = "loss", stats["loss"]
        elif not math.isfinite(stats["aux"]):
            what, value = "load-balance loss", stats["aux"]
        else:
            what, value = "gradient norm", stats["grad_norm"]
        return NonFiniteLoss(
            f"the {what} became {value} at step {step}; stopped without applying that update, {keep}: "
            "lower --lr (or fix the data) and start a new run from scratch; resuming with the same settings "
            "would replay the same steps"
        )

    def _finish(self, step: int, total_steps: int, status: str) -> TrainResult:
        adapter_dir = None
        if status == "completed" and self.ctx.is_main:
            chosen = step
            if self.cfg.load_best_at_end and self.best_step is not None:
                chosen = self.best_step
            source = self.out / f"checkpoint-{chosen}"
            if not source.is_dir():  # best checkpoint not kept (e.g. save_total_limit); fall back to the last
                chosen, source = step, self.out / f"checkpoint-{step}"
            adapter_dir = self._export_adapter(source, step)
            ckpt.fault_point("summary", step)
            summary = {"status": status, "global_step": step, "adapter": str(adapter_dir),
                       "adapter_from_step": chosen, "best_step": self.best_step, "best_val_loss": self.best_val}
            atomic_write_text(self.out / "train_summary.json", json.dumps(summary, indent=1) + "\n")
            self._print(f"done: adapter from step {chosen} saved to {adapter_dir}"
                        + (f" (best val_loss {self.best_val:.4f})" if self.best_val is not None else ""))
        elif status == "interrupted" and self.ctx.is_main:
            self._print(f"interrupted at step {step}: checkpoint saved to {self.out / f'checkpoint-{step}'}; "
                        "continue with --resume")
        self.ctx.barrier()
        if status == "completed":
            adapter_dir = self.out / ADAPTER_DIR
        return TrainResult(self.out, adapter_dir, status, step, total_steps, self.best_step, self.best_val,
                           self._signal, list(self.history))

    def _export_adapter(self, checkpoint: Path, step: int) -> Path:
        import shutil

        final = self.out / ADAPTER_DIR
        tmp = self.out / f".tmp-{ADAPTER_DIR}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        skip = ("optimizer.", "scheduler.", "rng_state_", ckpt.STATE_NAME)
        for item in checkpoint.iterdir():
            if item.is_file() and not item.name.startswith(skip):
                shutil.copy2(item, tmp / item.name)
        ckpt.fault_point("export", step)
        ckpt.replace_dir(tmp, final)
        return final

    # ------------------------------------------------------------------ logs
    def _open_writers(self, step: int) -> None:
        if not self.ctx.is_main:
            return
        if "tensorboard" in self.cfg.reporters:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(self.out / "logs"), purge_step=step or None)
            self._writers.append(self._tb)
        if "wandb" in self.cfg.reporters:
            import wandb

            self._wandb = wandb.init(project=self.cfg.wandb_project, name=self.cfg.run_name,
                                     config=self.cfg.to_dict(), dir=str(self.out), resume="allow")

    def _close_writers(self) -> None:
        for writer in self._writers:
            writer.close()
        self._writers.clear()
        if getattr(self, "_wandb", None) is not None:
            self._wandb.finish()
            self._wandb = None

    def _emit(self, record: dict[str, Any]) -> None:
        """One metrics record: history, metrics.jsonl, TensorBoard, W&B (rank 0)."""
        compact = {k: v for k, v in record.items() if k != "router_load"}
        self.history.append(compact)
        if not self.ctx.is_main:
            return
        with open(self.out / METRICS_NAME, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        step = record["step"]
        scalars = {k: v for k, v in compact.items() if k != "step" and isinstance(v, (int, float))}
        if getattr(self, "_tb", None) is not None:
            for key, value in scalars.items():
                group = "eval" if key == "val_loss" or key.startswith("router") else "train"
                self._tb.add_scalar(f"{group}/{key}", value, step)
            for path, row in (record.get("router_load") or {}).items():
                for i, x in enumerate(row):
                    self._tb.add_scalar(f"router_load/{path}/expert{i}", x, step)
            self._tb.flush()
        if getattr(self, "_wandb", None) is not None:
            self._wandb.log(scalars, step=step)

    def _log_train(self, step: int, steps_per_epoch: int, window: dict[str, float], lr: float,
                   grad_norm: float) -> None:
        n = max(window["steps"], 1)
        record = {"step": step, "epoch": round(step / steps_per_epoch, 4), "loss": window["loss"] / n,
                  "aux_loss": window["aux"] / n, "lr": lr, "grad_norm": grad_norm,
                  "tokens_per_s": window["tokens"] / max(window["time"], 1e-9)}
        loads = self._take_router_load()
        if loads:
            record.update({f"router_{k}": v for k, v in self.router_summary(loads).items()}, router_load=loads)
        self._emit(record)

    def _print(self, message: str) -> None:
        if not self.ctx.is_main:
            return
        if self._bar is not None and not self._bar.disable:
            self._bar.write(message)
        else:
            print(message, flush=True)

    def _report_start(self, data: PreparedData, total_steps: int, steps_per_epoch: int,
                      resumed_at: int | None) -> None:
        cfg, ctx = self.cfg, self.ctx
        model = unwrap(self.model)
        trainable, total = model.get_nb_trainable_parameters()
        what = (f"PERFT-{cfg.variant[0].upper()} ({cfg.adapter}, r={cfg.rank}"
                + (f", {cfg.top_k} of {cfg.num_experts} experts" if cfg.variant == "routed" else "")
                + (f", {cfg.num_experts} experts" if cfg.variant == "dense" else "") + ")"
                if cfg.method == "perft" else f"LoRA baseline {cfg.method} (r={cfg.rank})")
        accumulation = cfg.grad_accumulation(ctx.world_size)
        lines = [
            f"perft train: {what} on {cfg.model}",
            f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}",
            f"data: {len(self.train_ds):,d} train / {len(self.val_ds) if self.val_ds is not None else 0:,d} val "
            f"records ({data.truncated} cut at {cfg.cutoff_len} tokens"
            + (f", {data.no_target} with no response token left" if data.no_target else "") + ")",
            f"steps: {total_steps} ({steps_per_epoch}/epoch); batch {cfg.batch_size} = micro {self.micro} x "
            f"accumulation {accumulation} x {ctx.world_size} process(es); device {ctx.device}"
            f"{', bf16 autocast' if self.use_bf16 else ''}"
            + (f"; {cfg.strategy}" if ctx.distributed else ""),
        ]
        if resumed_at is not None:
            lines.append(f"resumed at step {resumed_at}")
        else:
            self._emit({"step": 0, "trainable_params": trainable, "all_params": total,
                        "trainable_pct": 100 * trainable / total})
        self._print("\n".join(lines))
        if ctx.is_main and getattr(self, "_tb", None) is not None:
            self._tb.add_text("run", "\n\n".join(lines), resumed_at or 0)

    # ------------------------------------------------------------------ signals
    def _install_signal_handlers(self) -> dict[int, Any]:
        if threading.current_thread() is not threading.main_thread():
            return {}

        def handler(signum: int, frame: Any) -> None:
            if self._signal is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt  # second Ctrl-C: stop now
            self._signal = signum
            if self.ctx.is_main:
                print(f"\nperft train: got {signal.Signals(signum).name}; saving a checkpoint after this step "
                      "(Ctrl-C again to abort without saving)", file=sys.stderr, flush=True)

        previous = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.getsignal(sig)
            signal.signal(sig, handler)
        return previous

    @staticmethod
    def _restore_signal_handlers(previous: dict[int, Any]) -> None:
        for sig, old in previous.items():
            signal.signal(sig, old)
