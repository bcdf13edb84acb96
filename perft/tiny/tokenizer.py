"""A small byte-level BPE tokenizer for the embedded default, trained with `tokenizers`.

It is trained on corpus text plus the fixed strings of the prompt template and the tasks'
answer formats (never on task items), so prompts tokenize compactly. Wrapped in
`transformers.PreTrainedTokenizerFast` and saved with `save_pretrained`, it loads with
`AutoTokenizer.from_pretrained(dir)`. Encoding adds `<s>` in front (as every pretraining
document starts); the fine-tuning code appends `</s>` itself.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from perft.data.prompts import build_prompt

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)  # ids 0, 1, 2, 3


def template_texts(repeat: int = 50) -> list[str]:
    """Fixed strings of the prompt template and answer formats (no task items), `repeat` times."""
    fixed = [
        build_prompt(
            "Please choose the correct answer to the question: Which one?", output="the correct answer is"
        ),
        build_prompt("How many does it have now?", input="Some context.", output="The answer is 1"),
        "Answer format: answer1/answer2/answer3/answer4/answer5",
        "Answer format: option1/option2 Answer format: true/false solution1/solution2 ending1/ending2",
        "Answer1: Answer2: Answer3: Answer4: Answer5: Option1: Option2:",
        "the correct answer is answer1 the correct answer is answer2 the correct answer is answer3",
        "What Which Where Why How many does have left now in total? Each bag holds",
        " ".join(str(i) for i in range(101)),
    ]
    return fixed * repeat


def train_tokenizer(texts: Iterable[str], vocab_size: int = 2048) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on `texts` (+ the template strings) and wrap it for transformers."""
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = list(texts) + template_texts()
    tok.train_from_iterator(corpus, trainer=trainer, length=len(corpus))
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return wrap(tok)


def wrap(tok: Tokenizer) -> PreTrainedTokenizerFast:
    """A `PreTrainedTokenizerFast` around a trained `tokenizers.Tokenizer`."""
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        model_max_length=1024,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, directory: str | Path) -> None:
    tokenizer.save_pretrained(str(directory))
