"""The sentencepiece tokenizer: trained on the deduplicated corpus, or reused.

Reserved ids (fixed for every Helox tokenizer, trained here or reused):

    0 <pad>  padding; never in the token stream, masked out of every loss
    1 <unk>  unknown piece (rare: byte fallback spells unseen characters as bytes)
    2 <s>    beginning of sequence; not written into shards, available to the model
    3 </s>   end of sequence; written after every document in the shards

Options are chosen so that decode(encode(text)) == text for code: identity normalisation
(the corpus is already NFC), no whitespace collapsing, no dummy prefix, whitespace-only
pieces allowed (indentation becomes a few tokens), byte fallback for newlines, tabs and
unseen characters, digits split one by one.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import sentencepiece as spm

from shared.data.config import TokenizerConfig

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
SPECIAL_IDS = {"pad": PAD_ID, "unk": UNK_ID, "bos": BOS_ID, "eos": EOS_ID}


class TokenizerError(RuntimeError):
    """A tokenizer cannot be trained or a reused one is unusable."""


def training_lines(texts: list[str], sample_size: int, seed: int) -> list[str]:
    """The non-blank lines of the corpus, a seeded sample of at most sample_size of them, in corpus order."""
    lines = [line for text in texts for line in text.split("\n") if line.strip()]
    if len(lines) <= sample_size:
        return lines
    rng = np.random.default_rng(seed)
    picked = np.sort(rng.choice(len(lines), size=sample_size, replace=False))
    return [lines[i] for i in picked]


def train_tokenizer(texts: list[str], cfg: TokenizerConfig) -> bytes:
    """Train a sentencepiece model on the documents; returns the serialised model.

    One thread: the thread count is recorded in the model file, and a dataset's bytes must not
    depend on the machine (two threads save ~15% of a ~2 s training on the stdlib corpus).
    """
    lines = training_lines(texts, cfg.input_sentence_size, cfg.seed)
    if not lines:
        raise TokenizerError("no non-blank line to train the tokenizer on")
    spm.set_random_generator_seed(cfg.seed + 1)  # sentencepiece treats seed 0 as "random"
    out = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines),
            model_writer=out,
            model_type=cfg.model_type,
            vocab_size=cfg.vocab_size,
            byte_fallback=cfg.byte_fallback,
            split_digits=cfg.split_digits,
            character_coverage=cfg.character_coverage,
            input_sentence_size=cfg.input_sentence_size,
            shuffle_input_sentence=False,  # lines are already a seeded sample
            max_sentence_length=cfg.max_sentence_length,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            allow_whitespace_only_pieces=True,
            split_by_whitespace=True,
            pad_id=PAD_ID,
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            num_threads=1,
            minloglevel=2,
        )
    except RuntimeError as e:
        if "required_chars" in str(e):
            hint = (
                f"raise tokenizer.vocab_size (now {cfg.vocab_size}; byte fallback alone takes 256 ids) or lower "
                f"tokenizer.character_coverage (now {cfg.character_coverage}) so that fewer characters need an id"
            )
        else:
            hint = f"the corpus is too small for this vocabulary: lower tokenizer.vocab_size (now {cfg.vocab_size})"
        raise TokenizerError(f"sentencepiece training failed ({e}); {hint}") from e
    return out.getvalue()


def load_tokenizer(model: bytes | str | Path) -> spm.SentencePieceProcessor:
    """A processor from a serialised model or a .model file; checks the reserved ids."""
    shown = "<bytes>" if isinstance(model, bytes) else str(model)
    try:
        if isinstance(model, bytes):
            sp = spm.SentencePieceProcessor(model_proto=model)
        else:
            sp = spm.SentencePieceProcessor(model_file=str(model))
    except (OSError, RuntimeError) as e:
        raise TokenizerError(f"cannot load sentencepiece model {shown}: {e}") from e
    if sp.eos_id() < 0:
        raise TokenizerError(
            f"sentencepiece model {shown} defines no EOS id: "
            "shards separate documents with EOS; train with eos_id set"
        )
    return sp


def special_ids(sp: spm.SentencePieceProcessor) -> dict[str, int]:
    """The reserved ids of a processor (-1 where undefined)."""
    return {"pad": sp.pad_id(), "unk": sp.unk_id(), "bos": sp.bos_id(), "eos": sp.eos_id()}


def token_dtype(vocab_size: int) -> str:
    """uint16 when every id fits, else uint32."""
    return "uint16" if vocab_size <= 65535 else "uint32"
