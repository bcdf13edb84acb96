"""The output folder of a training run and its resume policy.

A run folder holds `training_config.yaml`, `metrics.jsonl`, `checkpoint-<step>/` folders,
after completion `adapter/` (the chosen checkpoint's adapter) and `train_summary.json`, and
`logs/` for TensorBoard. Every check happens before anything is written; a folder that holds
another run is never overwritten without `--overwrite-output-dir`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from perft.errors import PerftError
from perft.io import atomic_write_text, check_writable_dir
from perft.output_dir import OutputFolder, check_input_outside
from perft.training import checkpoint as ckpt

ADAPTER_DIR = "adapter"
METRICS_NAME = "metrics.jsonl"
SUMMARY_NAME = "train_summary.json"
CONFIG_NAME = "training_config.yaml"
MANAGED_NAMES = (METRICS_NAME, SUMMARY_NAME, CONFIG_NAME)  # files a run writes at the top of its folder


class RunFolder:
    """One run's output folder: which checkpoint to resume, preparing, exporting, summarising."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.adapter_dir = path / ADAPTER_DIR
        self.metrics = path / METRICS_NAME
        self.output: OutputFolder | None = None  # claimed by the main process

    def claim(self, resume: str | None, overwrite: bool, inputs: dict[str, Any]) -> None:
        """Apply the output-folder policy and take the folder's lock (fails at once if another run holds it)."""
        if resume is not None and overwrite:
            raise PerftError("--resume and --overwrite-output-dir contradict each other: pass --resume to continue "
                             "the run, or --overwrite-output-dir to start over, not both")
        for what, value in inputs.items():
            if value:
                check_input_outside(str(value), self.path, what, MANAGED_NAMES)
        legacy = (self.path / CONFIG_NAME).is_file() and bool(ckpt.list_checkpoints(self.path))
        self.output = OutputFolder(self.path, "train", overwrite=overwrite, legacy=legacy)

    def release(self) -> None:
        if self.output is not None:
            self.output.release()
            self.output = None

    # ------------------------------------------------------------------ before anything is written
    def resume_point(self, resume: str | None, overwrite: bool) -> Path | None:
        """The checkpoint to continue from (`--resume latest|auto|DIR`), or None for a new run."""
        if self.path.exists() and not self.path.is_dir():
            raise PerftError(f"output {self.path} exists and is not a directory: pick another --output")
        check_writable_dir(self.path)
        existing = ckpt.list_checkpoints(self.path)
        if resume is None:
            if (existing or self.adapter_dir.exists()) and not overwrite:
                what = existing[-1][1].name if existing else ADAPTER_DIR
                raise PerftError(
                    f"output {self.path} already holds a run ({what}): pass --resume to continue it, "
                    "--overwrite-output-dir to start over, or pick another --output"
                )
            return None
        if resume in ("latest", "auto"):
            if existing:
                return existing[-1][1]
            if resume == "auto":
                return None
            raise PerftError(f"--resume: no checkpoint in {self.path} to resume from; drop --resume to start a new run")
        path = Path(resume)
        if not path.is_dir():
            raise PerftError(f"--resume: checkpoint directory {path} does not exist")
        return path

    @staticmethod
    def check_resume(checkpoint: Path, fingerprint: dict[str, Any], data_hash: str, data_name: str) -> dict[str, Any]:
        """The checkpoint's state, if it was written by the same settings on the same data."""
        state = ckpt.read_state(checkpoint)
        saved = state.get("fingerprint", {})
        legacy = saved.get("model")  # a checkpoint from before content fingerprints recorded the base's path
        if isinstance(legacy, str) and not legacy.startswith("sha256:"):
            from perft.fingerprint import base_fingerprint

            if base_fingerprint(legacy) == fingerprint.get("model"):
                saved = {**saved, "model": fingerprint.get("model")}
        changed = sorted(k for k in set(saved) | set(fingerprint) if saved.get(k) != fingerprint.get(k))
        if changed:
            diffs = ", ".join(f"{k}: {saved.get(k)!r} -> {fingerprint.get(k)!r}" for k in changed[:4])
            raise PerftError(
                f"cannot resume from {checkpoint}: it was written by another config ({diffs}); resume with the "
                "same settings, or start a new run in another --output"
            )
        if state.get("data_hash") != data_hash:
            raise PerftError(
                f"cannot resume from {checkpoint}: the data file {data_name} changed since the checkpoint was "
                "written; restore it, or start a new run in another --output"
            )
        return state

    # ------------------------------------------------------------------ start
    def prepare(self, config: dict[str, Any], resumed_step: int | None, overwrite: bool) -> None:
        """Create the folder, clear what a new run replaces, trim the log of a resumed one, save the config."""
        try:
            self._prepare(config, resumed_step, overwrite)
        except OSError as err:  # e.g. read-only for root (immutable), or a full disk
            where = f" ({err.filename})" if err.filename else ""
            raise PerftError(f"cannot write to output {self.path}: {err.strerror or err}{where}; "
                             "pick another --output") from None

    def _prepare(self, config: dict[str, Any], resumed_step: int | None, overwrite: bool) -> None:
        import yaml

        self.path.mkdir(parents=True, exist_ok=True)
        moved = self.output.begin() if self.output is not None else None
        if moved is not None:
            print(f"moved the old contents of {self.path} aside to {moved} (--overwrite-output-dir)", flush=True)
        ckpt.remove_stale_temporaries(self.path)
        if resumed_step is None and overwrite:
            for _, path in ckpt.list_checkpoints(self.path):
                ckpt.remove_dir(path)  # never a torn checkpoint-N left by a kill
            for name in (ADAPTER_DIR, SUMMARY_NAME):
                target = self.path / name
                if target.is_dir() and not target.is_symlink():
                    ckpt.remove_dir(target)
                elif target.exists() or target.is_symlink():
                    target.unlink()
        if resumed_step is None and (self.metrics.exists() or self.metrics.is_symlink()):
            self.metrics.unlink()  # left by a run killed before its first checkpoint: not this run's
        saved = {**config, "resume": None, "overwrite_output_dir": False}  # rerunning it starts no surprise
        atomic_write_text(self.path / CONFIG_NAME, yaml.safe_dump(saved, sort_keys=False))
        if resumed_step is not None and self.metrics.exists():  # drop what the killed run logged after its checkpoint
            keep = []
            for line in self.metrics.read_text(encoding="utf-8").splitlines():
                try:
                    if json.loads(line).get("step", 0) <= resumed_step:
                        keep.append(line)
                except json.JSONDecodeError:  # a line torn by the kill
                    continue
            atomic_write_text(self.metrics, "".join(line + "\n" for line in keep))

    # ------------------------------------------------------------------ end
    def last_checkpoint_note(self) -> str:
        existing = ckpt.list_checkpoints(self.path)
        return (f"the last good checkpoint is {existing[-1][1]} (step {existing[-1][0]})" if existing
                else "no checkpoint was written yet")

    def export_adapter(self, checkpoint: Path, step: int) -> Path:
        """Copy the adapter files of `checkpoint` to `adapter/` (atomically replacing an older one)."""
        tmp = self.path / f".tmp-{ADAPTER_DIR}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        skip = ("optimizer.", "scheduler.", "rng_state_", ckpt.STATE_NAME, ckpt.DIGEST_NAME)
        self.check_finite_weights(checkpoint, skip)
        for item in checkpoint.iterdir():
            if item.is_file() and not item.name.startswith(skip):
                shutil.copy2(item, tmp / item.name)
        ckpt.fault_point("export", step)
        ckpt.replace_dir(tmp, self.adapter_dir)
        return self.adapter_dir

    @staticmethod
    def check_finite_weights(checkpoint: Path, skip: tuple[str, ...]) -> None:
        """Never export NaN or Inf adapter weights (issue 15)."""
        import torch

        from perft.io import load_safetensors
        from perft.training.state import NonFiniteLoss

        for item in sorted(checkpoint.glob("*.safetensors")):
            if item.name.startswith(skip):
                continue
            for name, tensor in load_safetensors(item).items():
                if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                    raise NonFiniteLoss(f"{item} holds NaN or Inf in {name}; no adapter was exported: lower --lr "
                                        "(or fix the data) and start a new run")

    def write_summary(self, summary: dict[str, Any]) -> None:
        atomic_write_text(self.path / SUMMARY_NAME, json.dumps(summary, indent=1) + "\n")
