"""The testbed's word-level tokenizer: one token per suite word, wrapped as a ``PreTrainedTokenizerFast``."""

from __future__ import annotations

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from reroute.testbed.suite import vocabulary

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer over the suite vocabulary; ids ``0..3`` are ``<pad> <s> </s> <unk>``.

    Encoding prepends ``<s>`` (so every sequence has a start token to attend to) and never appends ``</s>``:
    a prompt's ids then stay a prefix of the ids of prompt + answer, which log-likelihood scoring relies on.
    Decoding gives back the suite's text exactly: words joined by single spaces, lines by bare line breaks.
    """
    words = list(SPECIAL_TOKENS) + vocabulary()
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=UNK))
    # The Whitespace pre-tokenizer's split (\w+|[^\w\s]+, spaces dropped: "add7" and "11" stay one token, "=" is
    # its own) plus the line break, kept as a token because it separates few-shot demonstrations.
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"\w+|[^\w\s]+|\n"), behavior="removed", invert=True)
    core.decoder = decoders.Sequence(
        [
            decoders.Replace(Regex("^"), " "),  # a space before every token,
            decoders.Fuse(),  # joined,
            decoders.Replace(Regex(" ?\n ?"), "\n"),  # none around line breaks,
            decoders.Strip(" ", 1, 0),  # none in front.
        ]
    )
    core.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, words.index(BOS))])
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        clean_up_tokenization_spaces=False,
        model_max_length=256,
    )


def encode_training(tokenizer: PreTrainedTokenizerFast, texts: list[str]) -> list[list[int]]:
    """Token ids of full training sequences: ``<s> text </s>`` (EOS ends the answer, so generation stops)."""
    return [ids + [tokenizer.eos_token_id] for ids in tokenizer(texts)["input_ids"]]
