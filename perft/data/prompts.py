"""The Alpaca-style prompt template of LLM-Adapters, used by the paper for training and evaluation.

Training and evaluation must build prompts with the same function, otherwise the model is
evaluated on a format it never saw. Two styles:

- `clean` (the default): the template's text without stray whitespace, the same for training
  and evaluation.
- `released`: the exact strings of the released training and evaluation scripts (LLM-Adapters'
  `finetune.py` and `commonsense_evaluate.py`, which the PERFT code reuses): every line after
  the first indented by 16 spaces, the training string's first line ending in
  "  # noqa: E501" (a linter comment that slipped inside the string), and the evaluation
  string differing from the training one (no noqa text, no indented blank lines, 16 spaces
  after "### Response:\n"). Use it to evaluate adapters trained by the released code.
"""

from __future__ import annotations

RESPONSE_MARKER = "### Response:"

_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n" + RESPONSE_MARKER + "\n"
)
_WITHOUT_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n" + RESPONSE_MARKER + "\n"
)


_PAD = " " * 16
_INTRO_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further context. "
                "Write a response that appropriately completes the request.")
_INTRO = "Below is an instruction that describes a task. Write a response that appropriately completes the request."
# The released training strings (finetune.py): blank lines inside carry the 16 spaces too.
_RELEASED_TRAIN_WITH_INPUT = (
    _INTRO_INPUT + "  # noqa: E501\n\n" + _PAD + "### Instruction:\n" + _PAD + "{instruction}\n" + _PAD + "\n"
    + _PAD + "### Input:\n" + _PAD + "{input}\n" + _PAD + "\n" + _PAD + RESPONSE_MARKER + "\n" + _PAD
)
_RELEASED_TRAIN_WITHOUT_INPUT = (
    _INTRO + "  # noqa: E501\n\n" + _PAD + "### Instruction:\n" + _PAD + "{instruction}\n" + _PAD + "\n"
    + _PAD + RESPONSE_MARKER + "\n" + _PAD
)
# The released evaluation strings (commonsense_evaluate.py): no noqa text, empty blank lines,
# and a space after "request." only in the form without input.
_RELEASED_EVAL_WITH_INPUT = (
    _INTRO_INPUT + "\n\n" + _PAD + "### Instruction:\n" + _PAD + "{instruction}\n\n" + _PAD + "### Input:\n"
    + _PAD + "{input}\n\n" + _PAD + RESPONSE_MARKER + "\n" + _PAD
)
_RELEASED_EVAL_WITHOUT_INPUT = (
    _INTRO + " \n\n" + _PAD + "### Instruction:\n" + _PAD + "{instruction}\n\n" + _PAD + RESPONSE_MARKER + "\n" + _PAD
)

PROMPT_STYLES = ("clean", "released")
_TEMPLATES = {  # (style, for evaluation) -> (with input, without input)
    ("clean", False): (_WITH_INPUT, _WITHOUT_INPUT),
    ("clean", True): (_WITH_INPUT, _WITHOUT_INPUT),
    ("released", False): (_RELEASED_TRAIN_WITH_INPUT, _RELEASED_TRAIN_WITHOUT_INPUT),
    ("released", True): (_RELEASED_EVAL_WITH_INPUT, _RELEASED_EVAL_WITHOUT_INPUT),
}


def build_prompt(instruction: str, input: str | None = None, output: str | None = None, *,
                 style: str = "clean", for_eval: bool = False) -> str:
    """Return the prompt for one record; with `output`, the full training text (prompt + response).

    `style` is one of PROMPT_STYLES; `for_eval` picks the evaluation string where the style
    has its own (`released`). Without `output`, the training prompt is the prefix of the full
    training text, so response-only losses mask exactly the prompt.
    """
    if (style, for_eval) not in _TEMPLATES:
        from perft.errors import PerftError

        raise PerftError(f"unknown prompt style {style!r}; choose one of: {', '.join(PROMPT_STYLES)}")
    with_input, without_input = _TEMPLATES[style, for_eval]
    prompt = (with_input if input else without_input).format(instruction=instruction, input=input or "")
    return prompt + output if output is not None else prompt


def response_of(text: str) -> str:
    """The text after the last response marker (how the paper reads a generation)."""
    return text.rsplit(RESPONSE_MARKER, 1)[-1].strip()
