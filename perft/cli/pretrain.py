"""`perft pretrain`: pretrain a small OLMoE on the generated corpus (the embedded default's recipe)."""

from __future__ import annotations

import argparse
import dataclasses

from perft.tiny.pretrain_config import PretrainConfig

_HELP = {
    "output": "directory to write the checkpoint to (replaced atomically)",
    "seed": "seed of the corpus, the data order and the initialisation",
    "steps": "optimizer steps (one pass over fresh text: steps x batch x seq-len tokens)",
    "batch_size": "sequences per step",
    "seq_len": "tokens per packed sequence",
    "lr": "peak learning rate (AdamW)",
    "min_lr_ratio": "final learning rate as a fraction of the peak (cosine decay)",
    "warmup_steps": "linear warm-up steps",
    "weight_decay": "AdamW weight decay on matrices",
    "grad_clip": "gradient-norm clip",
    "hidden_size": "model width",
    "num_layers": "decoder layers (each one an MoE layer)",
    "num_heads": "attention heads",
    "num_experts": "experts per MoE layer",
    "top_k": "experts each token is routed to",
    "intermediate_size": "width of each expert's MLP",
    "router_aux_loss_coef": "weight of the Switch-style router balance loss",
    "vocab_size": "upper bound on the BPE vocabulary",
    "tokenizer_docs": "corpus documents the tokenizer is trained on",
    "eval_docs_per_domain": "held-out documents per domain for the final loss and routing statistics",
    "threads": "torch CPU threads (part of what makes a run reproducible)",
    "precision": "auto: bf16 autocast where the CPU has native bf16 (weights stay fp32), else fp32",
    "deterministic": "use torch's deterministic algorithms",
    "log_every": "steps between log lines",
    "overwrite_output_dir": "if --output holds files perft did not write, move that folder aside first",
}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "pretrain",
        help="pretrain a small OLMoE from scratch on generated text (the embedded default's recipe)",
        description=(
            "Pretrain a small OLMoE mixture-of-experts model on CPU, on the project's generated multi-domain "
            "corpus, and save it with its tokenizer (loadable with AutoModelForCausalLM/AutoTokenizer). "
            "The defaults build the embedded default model; results are deterministic for a given seed, "
            "thread count and torch build."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    defaults = PretrainConfig()
    for field in dataclasses.fields(PretrainConfig):
        flag = "--" + field.name.replace("_", "-")
        default = getattr(defaults, field.name)
        if isinstance(default, bool):
            parser.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=default, help=_HELP[field.name]
            )
        else:
            parser.add_argument(flag, type=type(default), default=default, help=_HELP[field.name])
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from perft.tiny.pretrain import pretrain

    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(PretrainConfig)}
    pretrain(PretrainConfig(**values))
    return 0
