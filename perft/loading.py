"""Loading base models and tokenizers the way users do, with errors that say what to fix.

Weights load through `from_pretrained` (safetensors only: `use_safetensors=True`), and
remote code runs only when the caller asks for it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from perft.errors import PerftError

_DTYPES = {"auto": "auto", "float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype | None) -> Any:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise PerftError(f"unknown dtype {dtype!r}; choose one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]


def first_line(err: BaseException) -> str:
    """The first line of an error message, plus the fix when it is about remote code."""
    text = str(err).strip()
    line = text.splitlines()[0] if text else type(err).__name__
    if "trust_remote_code" in text and "trust_remote_code" not in line:
        line += " Pass --trust-remote-code (trust_remote_code=True) only if you trust that code."
    return line


def check_local_path(name_or_path: str, *, needs_config: bool = True) -> None:
    """A local-looking path must exist (and hold a config.json for a model); hub names pass through."""
    path = Path(name_or_path)
    looks_local = path.is_absolute() or name_or_path.startswith((".", "~")) or path.exists()
    if looks_local:
        if not path.exists():
            raise PerftError(f"path {name_or_path} does not exist")
        if needs_config and path.is_dir() and not (path / "config.json").is_file():
            raise PerftError(f"{name_or_path} has no config.json: it is not a Hugging Face model directory")


def _refuse_pickle_only(directory: Path) -> None:
    """A local model folder with only pickle-based weights gets a message saying why it is refused."""
    if not directory.is_dir() or any(directory.glob("*.safetensors")):
        return
    from perft.io import PICKLE_SUFFIXES

    pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise PerftError(
            f"{directory} holds only pickle-based weights ({', '.join(pickles[:3])}), which perft refuses to load "
            "(unpickling can run arbitrary code): convert them to safetensors with a tool you trust"
        )


def load_base_model(
    name_or_path: str,
    *,
    dtype: str | torch.dtype | None = "auto",
    trust_remote_code: bool = False,
    experts_implementation: str | None = None,
    device_map: Any = None,
    load_in_4bit: bool = False,
    load_in_8bit: bool = False,
    bnb_4bit_quant_type: str = "nf4",
    **kwargs: Any,
) -> nn.Module:
    """`AutoModelForCausalLM.from_pretrained` with safetensors only and clear errors.

    `load_in_4bit` / `load_in_8bit` store the fused MoE experts quantized (perft.quantization).
    """
    from transformers import AutoModelForCausalLM

    from perft.quantization import expert_quantization, quantize_moe_experts

    quantization = expert_quantization(load_in_4bit, load_in_8bit, bnb_4bit_quant_type)

    check_local_path(str(name_or_path))
    _refuse_pickle_only(Path(name_or_path))
    extra: dict[str, Any] = dict(kwargs)
    if experts_implementation is not None:
        extra["experts_implementation"] = experts_implementation
    if device_map is not None:
        extra["device_map"] = device_map
    from safetensors import SafetensorError

    try:
        model = AutoModelForCausalLM.from_pretrained(
            name_or_path,
            dtype=resolve_dtype(dtype),
            trust_remote_code=trust_remote_code,
            use_safetensors=True,
            **extra,
        )
    except SafetensorError as err:  # a truncated or corrupted weights file
        raise PerftError(
            f"cannot load model {name_or_path!r}: its safetensors weights are truncated or corrupted ({err})"
        ) from None
    except (OSError, ValueError, RuntimeError) as err:  # RuntimeError: tensor shapes that contradict config.json
        if "mismatched_sizes" in str(err):
            raise PerftError(f"cannot load model {name_or_path!r}: the shapes of its weights do not match its "
                             "config.json; the checkpoint is damaged or its config belongs to another model") from None
        raise PerftError(f"cannot load model {name_or_path!r}: {first_line(err)}") from None
    return quantize_moe_experts(model, *quantization) if quantization else model


def load_tokenizer(name_or_path: str, *, trust_remote_code: bool = False, padding_side: str = "right") -> Any:
    """Load a tokenizer; one without a pad token gets its EOS token as pad (said once, on stderr)."""
    from transformers import AutoTokenizer

    check_local_path(str(name_or_path), needs_config=False)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise PerftError(f"cannot load the tokenizer of {name_or_path!r}: {first_line(err)}") from None
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise PerftError(
                f"the tokenizer of {name_or_path} has neither a pad nor an EOS token; add a pad token to it"
            )
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = padding_side
    return tokenizer
