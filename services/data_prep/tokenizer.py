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
TRAIN_THREADS = 2


class TokenizerError(RuntimeError):
    """A tokenizer cannot be trained or a reused one is unusable."""


def training_lines(texts: list[str], sample_size: int, seed: int) -> list[str]:
    """The non-blank lines of the corpus, a seeded sample of at most sample_size of them, in corpus order."""
    lines: list[str] = []
    for text in texts:
        lines += filter(str.strip, text.split("\n"))  # the lines whose strip() is not empty
    if len(lines) <= sample_size:
        return lines
    rng = np.random.default_rng(seed)
    picked = np.sort(rng.choice(len(lines), size=sample_size, replace=False))
    return [lines[i] for i in picked.tolist()]  # Python ints: indexing with numpy scalars is ~3x slower


def train_tokenizer(texts: list[str], cfg: TokenizerConfig, user_defined_symbols: tuple[str, ...] = ()) -> bytes:
    """Train a sentencepiece model on the documents; returns the serialised model.

    `user_defined_symbols` become single pieces that encode and decode as themselves (RAG
    packing's boundary tokens, shared.data.config.RAG_BOUNDARY_TOKENS).

    Always TRAIN_THREADS threads, whatever the machine: the count is recorded in the model file
    and a dataset's bytes must not depend on the machine. The pieces and scores are the same
    with 1 and 2 threads (checked on the stdlib corpus); two save ~15% of a ~2 s training.
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
            num_threads=TRAIN_THREADS,
            minloglevel=2,
            **({"user_defined_symbols": list(user_defined_symbols)} if user_defined_symbols else {}),
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


def user_defined_ids(sp: spm.SentencePieceProcessor, symbols: tuple[str, ...]) -> dict[str, int]:
    """The ids of user-defined pieces; raises TokenizerError naming those the model lacks."""
    ids = {s: sp.piece_to_id(s) for s in symbols}
    missing = [s for s, i in ids.items() if i == sp.unk_id() or not _user_defined(sp, i)]
    if missing:
        raise TokenizerError(
            f"the tokenizer has no user-defined piece for {missing}: RAG packing (data.rag) needs "
            f"{list(symbols)}; train a new tokenizer (drop tokenizer.from_dataset / tokenizer.model_path) "
            "or reuse one trained with data.rag set"
        )
    return ids


def _user_defined(sp: spm.SentencePieceProcessor, i: int) -> bool:
    # sentencepiece's Python API has no is_user_defined; such a piece encodes to itself alone
    piece = sp.id_to_piece(i)
    return sp.encode(piece) == [i] and not sp.is_control(i) and not sp.is_byte(i)


def token_dtype(vocab_size: int) -> str:
    """uint16 when every id fits, else uint32."""
    return "uint16" if vocab_size <= 65535 else "uint32"


# --- fast encoding: line by line, each distinct line once -------------------------------
#
# sentencepiece encodes a whole document as one sequence; on Python source that runs at
# ~4 MB/s per core. When no piece of the vocabulary contains "\n" (training lines never do),
# no merge crosses a newline, so a document's ids are the ids of its lines joined by the ids
# of "\n" -- provided the normaliser works line-locally: identity normalisation, no dummy
# prefix, no whitespace collapsing (Helox's own options). Lines repeat a lot in code (about
# 40% of the stdlib's), and short inputs encode faster per byte than long ones: encoding each
# distinct line once is ~2.5x faster than sp.encode over whole documents, with identical ids.
# Models that do not qualify (a reused external model, say) are encoded whole.


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, i
        shift += 7


def _proto_fields(buf: bytes) -> dict[int, list[int | bytes]]:
    """The fields of one protobuf message (wire format), by number; enough to read sentencepiece specs."""
    fields: dict[int, list[int | bytes]] = {}
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        number, wire = key >> 3, key & 7
        value: int | bytes
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 1:
            value, i = buf[i : i + 8], i + 8
        elif wire == 2:
            n, i = _varint(buf, i)
            value, i = buf[i : i + n], i + n
        elif wire == 5:
            value, i = buf[i : i + 4], i + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        fields.setdefault(number, []).append(value)
    return fields


_MODEL_TYPES = {1: "unigram", 2: "bpe", 3: "word", 4: "char"}


def model_spec(sp: spm.SentencePieceProcessor) -> dict[str, object]:
    """What line-by-line encoding depends on, read from the serialized ModelProto: the
    TrainerSpec's model_type (field 2.3, default unigram) and the NormalizerSpec's name,
    add_dummy_prefix and remove_extra_whitespaces (fields 3.1, 3.3, 3.4; booleans default true)."""
    model = _proto_fields(sp.serialized_model_proto())
    trainer = _proto_fields(model[2][0]) if 2 in model else {}  # type: ignore[arg-type]
    spec = _proto_fields(model[3][0]) if 3 in model else {}  # type: ignore[arg-type]
    name = spec.get(1, [b""])[0]
    return {
        "model_type": _MODEL_TYPES.get(int(trainer.get(3, [1])[0]), "unknown"),  # type: ignore[call-overload]
        "normalizer": name.decode() if isinstance(name, bytes) else "",
        "add_dummy_prefix": bool(spec.get(3, [1])[0]),
        "remove_extra_whitespaces": bool(spec.get(4, [1])[0]),
    }


LINE_LOCAL_SPEC = {"model_type": "bpe", "normalizer": "identity", "add_dummy_prefix": False,
                   "remove_extra_whitespaces": False}
"""Only BPE: its merges are ordered by (score, leftmost position), so a segment between two
newlines merges as it would alone. Unigram's Viterbi breaks ties between equal-score paths
(e.g. 16+12 vs 12+16 spaces) differently in context: measured on the stdlib, not identical."""


def newline_ids(sp: spm.SentencePieceProcessor) -> list[int] | None:
    """The ids "\\n" always encodes to when documents can be encoded line by line, else None."""
    if model_spec(sp) != LINE_LOCAL_SPEC:
        return None
    if any("\n" in sp.id_to_piece(i) for i in range(sp.vocab_size())):
        return None
    ids = sp.encode("\n")
    if len(ids) != 1 or not sp.is_byte(ids[0]):  # one byte-fallback id, never a (merged) <unk>
        return None
    return ids


class DocumentEncoder:
    """sp.encode for a list of documents: line by line, each distinct line of the list encoded
    once, when the model allows it (see newline_ids), else whole documents. Either way the ids
    are exactly sp.encode's. (A cache kept across calls was slower: ~250k distinct lines per 15 MB.)"""

    def __init__(self, sp: spm.SentencePieceProcessor) -> None:
        self.sp = sp
        self.newline = newline_ids(sp)

    @property
    def by_line(self) -> bool:
        return self.newline is not None

    def encode(self, texts: list[str]) -> list[list[int]]:
        """The ids of each text (sp.encode's)."""
        if self.newline is None:
            return self.sp.encode(texts, num_threads=1)
        table = self._line_table(texts)
        nl = self.newline
        out = []
        for text in texts:
            lines = text.split("\n")
            ids = list(table[lines[0]])
            for line in lines[1:]:
                ids += nl
                ids += table[line]
            out.append(ids)
        return out

    def encode_flat(self, texts: list[str], eos: int) -> tuple[list[int], list[int]]:
        """All texts' ids in one list, each text followed by `eos`, and the tokens per text (eos included)."""
        if self.newline is None:
            flat, lengths = [], []
            for ids in self.sp.encode(texts, num_threads=1):
                flat += ids
                flat.append(eos)
                lengths.append(len(ids) + 1)
            return flat, lengths
        table = self._line_table(texts)
        nl = self.newline
        flat, lengths = [], []
        for text in texts:
            start = len(flat)
            lines = text.split("\n")
            flat += table[lines[0]]
            for line in lines[1:]:
                flat += nl
                flat += table[line]
            flat.append(eos)
            lengths.append(len(flat) - start)
        return flat, lengths

    def _line_table(self, texts: list[str]) -> dict[str, list[int]]:
        distinct = list(dict.fromkeys(line for text in texts for line in text.split("\n")))
        return dict(zip(distinct, self.sp.encode(distinct, num_threads=1), strict=True))
