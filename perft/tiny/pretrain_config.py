"""`PretrainConfig`: the settings of a `perft pretrain` run, importable without torch/transformers.

Kept apart from the recipe so the CLI can build its flags without loading the model code.
"""

from __future__ import annotations

from dataclasses import dataclass

from perft.errors import PerftError

PRECISIONS = ("auto", "bf16", "fp32")


@dataclass
class PretrainConfig:
    """Everything that determines a pretraining run (and so its weights)."""

    output: str = "tiny-olmoe"
    seed: int = 0
    steps: int = 800
    batch_size: int = 16
    seq_len: int = 256
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 60
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_experts: int = 8
    top_k: int = 2
    intermediate_size: int = 128
    router_aux_loss_coef: float = 0.01
    vocab_size: int = 2048
    tokenizer_docs: int = 30000
    eval_docs_per_domain: int = 200
    threads: int = 1
    precision: str = "auto"
    deterministic: bool = True
    log_every: int = 50
    overwrite_output_dir: bool = False

    def validate(self) -> None:
        self._validate_numbers()
        positive = (
            "steps", "batch_size", "seq_len", "hidden_size", "num_layers", "num_heads", "num_experts",
            "top_k", "intermediate_size", "vocab_size", "tokenizer_docs", "threads",
        )  # fmt: skip
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise PerftError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
        if self.top_k > self.num_experts:
            raise PerftError(f"--top-k {self.top_k} exceeds --num-experts {self.num_experts}: lower --top-k")
        if self.hidden_size % self.num_heads:
            raise PerftError(
                f"--hidden-size {self.hidden_size} is not divisible by --num-heads {self.num_heads}: change either"
            )
        if (self.hidden_size // self.num_heads) % 2:
            raise PerftError("the head size (hidden size / heads) must be even for rotary embeddings")
        if not self.lr > 0 or not 0 <= self.min_lr_ratio <= 1:
            raise PerftError("--lr must be > 0 and --min-lr-ratio in [0, 1]")
        if self.precision not in PRECISIONS:
            raise PerftError(
                f"--precision {self.precision!r} is unknown; choose one of: {', '.join(PRECISIONS)}"
            )
        if self.vocab_size < 300:
            raise PerftError(f"--vocab-size {self.vocab_size} is too small for a byte-level BPE: use >= 300")

    def _validate_numbers(self) -> None:
        """Finite, in range and bounded: checked before the first line of work."""
        import math

        for name in ("lr", "min_lr_ratio", "weight_decay", "grad_clip", "router_aux_loss_coef"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise PerftError(f"--{name.replace('_', '-')} must be a finite number, got {value!r}")
        for name in ("weight_decay", "grad_clip", "router_aux_loss_coef"):
            if getattr(self, name) < 0:
                raise PerftError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)!r}")
        for name, low, high in (("seed", 0, 2**32 - 1), ("warmup_steps", 0, 10**9), ("log_every", 1, 10**9),
                                ("eval_docs_per_domain", 1, 10**7), ("steps", 1, 10**9), ("threads", 1, 4096)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise PerftError(f"--{name.replace('_', '-')} must be an integer in [{low}, {high}], got {value!r}")
