"""The `perft train` loop: the paper's recipe (AdamW, linear warm-up/decay, clipping, bf16,
best checkpoint by validation loss), on one process or many, resumable bit-for-bit.

The loop reads as setup / train / evaluate / save; its components live beside it: the run
folder and resume policy (`run_folder`), the metric loggers (`loggers`), signals
(`signals`), the train state that a checkpoint stores (`state`), checkpoint files
(`checkpoint`), the model (`modeling`, through the method registry `perft.methods`) and the
PERFT-R router load (`perft.routing.load`).

Loss normalisation. The cross-entropy of a step is summed over the response tokens of the
whole global batch and divided by their number, which every process computes from the
shared batch plan. Gradients therefore do not depend on how the global batch is cut into
micro-batches or processes, and a 2-process run matches a 1-process run with the same
global batch. The load-balance losses (frozen base router, PERFT-R router) are averaged
over the micro-batches of the step, as `transformers` computes them per forward pass.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Sequence
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
from perft.dropout import keyed_dropout
from perft.errors import PerftError
from perft.routing.load import RouterLoad, format_load, load_record, routed_layers
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
from perft.training.loggers import MetricLogger, check_reporters, open_loggers
from perft.training.modeling import (
    build_model,
    check_token_ids,
    describe_run,
    parameter_counts,
    preflight_model,
    resolve_bf16,
)
from perft.training.run_folder import ADAPTER_DIR, METRICS_NAME, RunFolder
from perft.training.signals import StopRequests
from perft.training.state import NonFiniteLoss, TrainResult, TrainState

__all__ = ["ADAPTER_DIR", "METRICS_NAME", "NonFiniteLoss", "TrainResult", "Trainer", "train"]

LENGTH_GROUP_MULTIPLIER = 50  # as transformers' LengthGroupedSampler
# Called after every optimiser step with {"step", "loss", "lr", "checkpoint" (path or None), "model"}.
Callback = Callable[[dict[str, Any]], None]


def train(config: TrainingConfig, *, callbacks: Sequence[Callback] = ()) -> TrainResult:
    """Run one fine-tuning job described by `config` (also under torchrun / accelerate launch)."""
    ctx = init_distributed()
    try:
        return Trainer(config, ctx, callbacks).run()
    finally:
        ctx.close()


class Trainer:
    """One run. Construct, then `run()`; every check happens before anything is written."""

    def __init__(self, cfg: TrainingConfig, ctx: DistributedContext, callbacks: Sequence[Callback] = ()) -> None:
        self.cfg, self.ctx, self.callbacks = cfg, ctx, list(callbacks)
        self.folder = RunFolder(Path(str(cfg.output)))
        self.state = TrainState()
        self.stop = StopRequests(announce=ctx.is_main)
        self.loggers: list[MetricLogger] = []
        self.bar: Any = None
        # Set by `_setup`:
        self.model: nn.Module | None = None
        self.wrapped: nn.Module | None = None
        self.data: PreparedData | None = None
        self.collate: PaddingCollator | None = None
        self.params: list[nn.Parameter] = []
        self.param_names: list[str] = []
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: Any = None
        self.train_load = RouterLoad({})
        self.base_aux_coef = 0.0
        self.pass_router_flag = False
        self.use_bf16 = False
        self.micro = 1
        self.lengths: list[int] = []  # of the training examples, in tokens
        self.targets: list[int] = []  # response tokens of each training example
        self.steps_per_epoch = self.total_steps = 1

    # ------------------------------------------------------------------ setup
    def run(self) -> TrainResult:
        try:
            resume_from = self._setup()
            return self._train(resume_from)
        finally:
            for logger in self.loggers:
                logger.close()
            self.loggers.clear()
            self.folder.release()

    def _setup(self) -> Path | None:
        """Check everything, load data and model, restore a checkpoint; then prepare the run folder."""
        cfg, ctx = self.cfg, self.ctx
        cfg.normalise()
        cfg.validate(ctx.world_size)
        check_reporters(cfg.reporters)
        if ctx.is_main:  # the output-folder policy and its lock (perft.output_dir)
            self.folder.claim(cfg.resume, cfg.overwrite_output_dir, inputs={"--data": cfg.data})
        resume_from = self.folder.resume_point(cfg.resume, cfg.overwrite_output_dir)
        if ctx.distributed:  # every process must continue from the same place (checkpoints on a shared disk)
            chosen = ctx.broadcast_object(str(resume_from) if resume_from else None)
            if ctx.any(chosen != (str(resume_from) if resume_from else None)):
                raise PerftError(
                    f"the processes disagree on the checkpoint to resume from (rank 0: {chosen}); put --output on "
                    "a file system that every node sees"
                )
        preflight_model(cfg)
        from perft.loading import load_tokenizer

        tokenizer = load_tokenizer(cfg.tokenizer or str(cfg.model), trust_remote_code=cfg.trust_remote_code)
        data = self.data = prepare_data(cfg.data, tokenizer, cutoff_len=cfg.cutoff_len,
                                        val_set_size=cfg.val_set_size, split_seed=cfg.split_seed,
                                        train_on_inputs=cfg.train_on_inputs, max_train_samples=cfg.max_train_samples,
                                        prompt_style=cfg.prompt_style)
        saved = (self.folder.check_resume(resume_from, cfg.fingerprint(), data.data_hash, str(cfg.data))
                 if resume_from else None)
        built = build_model(cfg, ctx, resume_from)
        model = self.model = built.model
        check_token_ids(unwrap(model), data, cfg.tokenizer or str(cfg.model))
        self.base_aux_coef, self.pass_router_flag = built.base_aux_coef, built.pass_router_flag

        self.collate = PaddingCollator(tokenizer.pad_token_id)
        self.lengths, self.targets = list(data.train["length"]), list(data.train["num_targets"])
        self.micro = cfg.micro_batch_size_for(ctx.world_size)
        self.use_bf16 = resolve_bf16(cfg.bf16, ctx.device)
        self.steps_per_epoch = math.ceil(len(data.train) / cfg.batch_size)
        self.total_steps = cfg.max_steps or math.ceil(cfg.epochs * self.steps_per_epoch)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.param_names, self.params = [n for n, _ in named], [p for _, p in named]
        from transformers import get_scheduler

        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                           eps=cfg.adam_epsilon, weight_decay=cfg.weight_decay)
        self.scheduler = get_scheduler(cfg.lr_scheduler, self.optimizer, num_warmup_steps=cfg.warmup_steps,
                                       num_training_steps=self.total_steps)
        self.wrapped = wrap_model(model, ctx, cfg.strategy)
        if saved is not None:
            assert resume_from is not None
            ckpt.load_training_state(resume_from, model=model, optimizer=self.optimizer,
                                     param_names=self.param_names, scheduler=self.scheduler, ctx=ctx)
            self.state = TrainState.from_checkpoint(saved, resume_from / ckpt.STATE_NAME)
            if not ctx.is_main:  # the saved router counts are the sum over processes: held by rank 0 alone
                self.state.window.router_counts.clear()
        self.train_load = RouterLoad(routed_layers(unwrap(model)), self.state.window.router_counts)

        # Everything is checked, the checkpoint's training state included: from here on the
        # output directory may change.
        if ctx.is_main:
            self.folder.prepare(cfg.to_dict(), self.state.global_step if saved else None, cfg.overwrite_output_dir)
            self.loggers = open_loggers(cfg.reporters, self.folder.path, self.folder.metrics, self.state.global_step,
                                        wandb_project=cfg.wandb_project, run_name=cfg.run_name, config=cfg.to_dict())
        ctx.barrier()
        return resume_from

    # ------------------------------------------------------------------ train
    def _train(self, resume_from: Path | None) -> TrainResult:
        cfg, ctx, state = self.cfg, self.ctx, self.state
        assert self.optimizer is not None and self.data is not None
        self._report_start(resumed=resume_from is not None)
        if resume_from is None and self.data.val is not None:
            self._evaluate(0)
        elif resume_from is None:
            self._log_router_start()
        last_saved = state.global_step if resume_from else -1
        from tqdm.auto import tqdm

        self.bar = tqdm(total=self.total_steps, initial=state.global_step, dynamic_ncols=True, unit="step",
                        desc="train", disable=not (ctx.is_main and cfg.progress))
        order_epoch, batches = -1, []
        try:
            with self.stop:
                while state.global_step < self.total_steps:
                    epoch, index = divmod(state.global_step, self.steps_per_epoch)
                    if epoch != order_epoch:
                        order = epoch_order(len(self.data.train), seed=cfg.seed, epoch=epoch,
                                            lengths=self.lengths,
                                            group_size=cfg.batch_size * LENGTH_GROUP_MULTIPLIER
                                            if cfg.group_by_length else 0)
                        batches, order_epoch = global_batches(order, cfg.batch_size), epoch
                    started = time.perf_counter()
                    stats = self._train_step(batches[index])
                    lr = self.optimizer.param_groups[0]["lr"]
                    if not all(math.isfinite(stats[k]) for k in ("loss", "aux", "grad_norm")):
                        raise self._non_finite(state.global_step + 1, stats)
                    self.optimizer.step()
                    self.scheduler.step()
                    self.optimizer.zero_grad(set_to_none=True)
                    state.global_step = step = state.global_step + 1
                    ckpt.fault_point("step", step)
                    elapsed = time.perf_counter() - started
                    state.window.add(stats, elapsed)
                    self.bar.update(1)
                    self.bar.set_postfix(loss=f"{stats['loss']:.4f}", lr=f"{lr:.2e}",
                                         tok_s=f"{stats['tokens'] / max(elapsed, 1e-9):.0f}", refresh=False)
                    if step % cfg.logging_steps == 0 or step == self.total_steps:
                        record = state.window.record(step, self.steps_per_epoch, lr, stats["grad_norm"])
                        self._emit({**record, **load_record(self.train_load.take(ctx.all_reduce_sum))})
                        state.window.reset()
                    if self.data.val is not None and (step % cfg.eval_steps == 0 or step == self.total_steps):
                        self._evaluate(step)
                    saved = None
                    if step % cfg.save_steps == 0 or step == self.total_steps:
                        saved, last_saved = self._save(), step
                    for callback in self.callbacks:
                        callback({"step": step, "loss": stats["loss"], "lr": lr, "checkpoint": saved,
                                  "model": unwrap(self.model)})
                    if ctx.any(self.stop.signum is not None):
                        if last_saved != step:
                            self._save()
                        return self._finish("interrupted")
        finally:
            self.bar.close()
        return self._finish("completed")

    def _train_step(self, batch_indices: list[int]) -> dict[str, float]:
        """Forward/backward over this process's micro-batches of one global batch; no optimiser step."""
        cfg, ctx = self.cfg, self.ctx
        assert self.wrapped is not None and self.data is not None
        lengths, targets = self.lengths, self.targets
        self.wrapped.train()
        ordered = sorted(batch_indices, key=lambda i: -lengths[i])  # similar lengths share a micro-batch
        micro = micro_batches_for_rank(ordered, self.micro, ctx.rank, ctx.world_size)
        n_micro = num_micro_batches(len(ordered), self.micro)
        per_rank = math.ceil(n_micro / ctx.world_size)  # every process runs as many passes (FSDP needs it)
        denominator = max(sum(targets[i] for i in ordered), 1)
        ce_sum = aux_sum = tokens = 0.0
        for j in range(per_rank):
            real = j < len(micro)
            rows = micro[j] if real else ordered[:1]
            batch = self._examples(rows, self.data.train)
            # Dropout masks keyed by (seed, step, sample): the same whatever the micro-batch or process.
            keyed = keyed_dropout(self.model, seed=cfg.seed, step=self.state.global_step, sample_ids=rows,
                                  attention_mask=batch["attention_mask"])
            with no_sync(self.wrapped, enabled=j != per_rank - 1), self._recording(real), keyed:
                ce, aux, _ = self._forward(batch)
                if real:
                    self.train_load.count(batch["attention_mask"])
                loss = ce * (ctx.world_size / denominator) + aux * (ctx.world_size / n_micro)
                (loss if real else loss * 0.0).backward()
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

    def _forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """(cross-entropy summed over target tokens, weighted balance losses, outputs)."""
        assert self.wrapped is not None
        kwargs: dict[str, Any] = {}
        if self.pass_router_flag:
            kwargs["output_router_logits"] = self.base_aux_coef > 0
        autocast = (torch.autocast(device_type=self.ctx.device.type, dtype=torch.bfloat16) if self.use_bf16
                    else contextlib.nullcontext())
        with autocast:
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
        assert self.collate is not None
        rows = ds[list(indices)]
        batch = self.collate([{"input_ids": i, "labels": lab} for i, lab in zip(rows["input_ids"], rows["labels"])])
        return {k: v.to(self.ctx.device) for k, v in batch.items()}

    def _recording(self, enabled: bool) -> contextlib.AbstractContextManager[Any]:
        """Record the PERFT-R routing of this forward pass (for the router load), if there is any."""
        model = unwrap(self.model)
        if not (enabled and self.train_load.layers and hasattr(model, "record_routing")):
            return contextlib.nullcontext()
        return model.record_routing()

    # ------------------------------------------------------------------ evaluate
    def _evaluate(self, step: int) -> float:
        """Mean cross-entropy per target token over the validation set (+ router load over it)."""
        ctx = self.ctx
        assert self.wrapped is not None and self.data is not None and self.data.val is not None
        val = self.data.val
        size = self.cfg.eval_batch_size or self.micro
        val_lengths = list(val["length"])
        order = sorted(range(len(val)), key=lambda i: -val_lengths[i])
        chunks = [order[i:i + size] for i in range(0, len(order), size)]
        mine = chunks[ctx.rank::ctx.world_size]
        load = RouterLoad(self.train_load.layers)
        ce_sum = aux_sum = count = 0.0
        self.wrapped.eval()
        with torch.no_grad():
            for j in range(math.ceil(len(chunks) / ctx.world_size)):
                real = j < len(mine)
                batch = self._examples(mine[j] if real else chunks[0], val)
                with self._recording(real):
                    ce, aux, _ = self._forward(batch)
                    if real:
                        load.count(batch["attention_mask"])
                if real:
                    ce_sum += ce.item()
                    aux_sum += aux.item()
                    count += float((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        ce_sum, aux_sum, count = ctx.all_reduce_sum([ce_sum, aux_sum, count])
        val_loss = ce_sum / max(count, 1.0)
        # The best checkpoint is chosen as the paper's trainer chooses it: by the loss including the
        # weighted balance terms (averaged over validation batches), not by cross-entropy alone.
        val_objective = val_loss + aux_sum / max(len(chunks), 1)
        loads = load.take(ctx.all_reduce_sum)
        record: dict[str, Any] = {"step": step, "val_loss": val_loss, "val_objective": val_objective,
                                  **load_record(loads)}
        if count == 0:  # no response token survived the cutoff in any validation example
            val_loss = float("nan")
        elif not math.isfinite(val_loss):  # as a non-finite training loss: stop, never pick or export it
            raise NonFiniteLoss(f"the validation loss became {val_loss} at step {step}; stopped, "
                                f"{self.folder.last_checkpoint_note()}: lower --lr (or fix the data) and start anew")
        ckpt.fault_point("eval", step)
        improved = count > 0 and self.state.improve(step, val_objective)
        self._emit(record)
        message = f"step {step}: val_loss {val_loss:.4f}" + (" (best)" if step > 0 and improved else "")
        if loads and step == 0:
            message += "\n" + format_load(loads, METRICS_NAME)
        elif loads:
            message += f", router max x N {record['router_max_load_x_n']:.2f}"
        self._print(message)
        return val_loss

    def _log_router_start(self) -> None:
        """Without a validation set: router figures of the first training batch, before any update."""
        if not self.train_load.layers:
            return
        assert self.wrapped is not None and self.data is not None
        load = RouterLoad(self.train_load.layers)
        first = list(range(min(len(self.data.train), self.micro)))
        self.wrapped.eval()
        with torch.no_grad(), self._recording(True):
            batch = self._examples(first, self.data.train)
            self._forward(batch)
            load.count(batch["attention_mask"])
        loads = load.take(self.ctx.all_reduce_sum)
        if loads:
            self._emit({"step": 0, **load_record(loads)})
            self._print(format_load(loads, METRICS_NAME))

    # ------------------------------------------------------------------ save
    def _save(self) -> Path:
        """A checkpoint of this step: adapter, optimiser, scheduler, RNG, and the train state."""
        ctx, state = self.ctx, self.state
        assert self.data is not None
        self.train_load.consolidate(ctx.all_reduce_sum, keep=ctx.is_main)
        payload = state.to_checkpoint(steps_per_epoch=self.steps_per_epoch, batch_size=self.cfg.batch_size,
                                      fingerprint=self.cfg.fingerprint(), data_hash=self.data.data_hash,
                                      world_size=ctx.world_size, method=self.cfg.method)
        path = ckpt.save_checkpoint(self.folder.path, state.global_step, model=unwrap(self.model),
                                    optimizer=self.optimizer, param_names=self.param_names,
                                    scheduler=self.scheduler, state=payload, ctx=ctx)
        if ctx.is_main:
            protect = {state.best_step} if state.best_step is not None else set()
            ckpt.rotate_checkpoints(self.folder.path, self.cfg.save_total_limit, protect, step=state.global_step)
        ctx.barrier()
        return path

    def _finish(self, status: str) -> TrainResult:
        step, best_step, best_val = self.state.global_step, self.state.best_step, self.state.best_val_loss
        out = self.folder.path
        if status == "completed" and self.ctx.is_main:
            chosen = best_step if self.cfg.load_best_at_end and best_step is not None else step
            source = out / f"checkpoint-{chosen}"
            if not source.is_dir():  # best checkpoint not kept (e.g. save_total_limit); fall back to the last
                chosen, source = step, out / f"checkpoint-{step}"
            adapter_dir = self.folder.export_adapter(source, step)
            ckpt.fault_point("summary", step)
            self.folder.write_summary({"status": status, "global_step": step, "adapter": str(adapter_dir),
                                       "adapter_from_step": chosen, "best_step": best_step,
                                       "best_val_loss": best_val})
            self._print(f"done: adapter from step {chosen} saved to {adapter_dir}"
                        + (f" (best val_loss + balance losses {best_val:.4f})" if best_val is not None else ""))
        elif status == "interrupted" and self.ctx.is_main:
            self._print(f"interrupted at step {step}: checkpoint saved to {out / f'checkpoint-{step}'}; "
                        "continue with --resume")
        self.ctx.barrier()
        return TrainResult(out, self.folder.adapter_dir if status == "completed" else None, status, step,
                           self.total_steps, best_step, best_val, self.stop.signum, list(self.state.history))

    def _non_finite(self, step: int, stats: dict[str, float]) -> NonFiniteLoss:
        if not math.isfinite(stats["loss"]):
            what, value = "loss", stats["loss"]
        elif not math.isfinite(stats["aux"]):
            what, value = "load-balance loss", stats["aux"]
        else:
            what, value = "gradient norm", stats["grad_norm"]
        return NonFiniteLoss(
            f"the {what} became {value} at step {step}; stopped without applying that update, "
            f"{self.folder.last_checkpoint_note()}: lower --lr (or fix the data) and start a new run from scratch; "
            "resuming with the same settings would replay the same steps"
        )

    # ------------------------------------------------------------------ logs
    def _emit(self, record: dict[str, Any]) -> None:
        """One metrics record: history (without per-layer loads), then every logger (main process)."""
        self.state.history.append({k: v for k, v in record.items() if k != "router_load"})
        for logger in self.loggers:
            logger.log(record)

    def _print(self, message: str) -> None:
        if not self.ctx.is_main:
            return
        if self.bar is not None and not self.bar.disable:
            self.bar.write(message)
        else:
            print(message, flush=True)

    def _report_start(self, resumed: bool) -> None:
        assert self.data is not None
        trainable, total = parameter_counts(unwrap(self.model))
        lines = describe_run(self.cfg, self.ctx, self.data, trainable=trainable, total=total, micro=self.micro,
                             steps=(self.total_steps, self.steps_per_epoch), bf16=self.use_bf16)
        if resumed:
            lines.append(f"resumed at step {self.state.global_step}")
        else:
            self._emit({"step": 0, "trainable_params": trainable, "all_params": total,
                        "trainable_pct": 100 * trainable / total})
        self._print("\n".join(lines))
        for logger in self.loggers:
            logger.text("run", "\n\n".join(lines), self.state.global_step)
