"""Text <-> token ids with the tokenizer a Mixtral checkpoint ships, and streaming decode.

Wraps `mistral_common` rather than `transformers` because Mistral publishes its
tokenizers (and, later, chat templates) there first. No torch here: the front door can
tokenize without loading the model stack.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence

from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

if TYPE_CHECKING:
    from mixtral.checkpoint import Checkpoint

_REPLACEMENT = "\ufffd"
_CONTEXT = 6  # prompt ids kept to frame the first delta (so it keeps its leading space)


class Tokenizer:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        # The tokenizer version (v1, v3, ...) comes from the file name, not the contents:
        # a v3 vocab saved as bare `tokenizer.model` loads as v1.
        self.mistral = MistralTokenizer.from_file(self.path)
        self._tok = self.mistral.instruct_tokenizer.tokenizer

    @classmethod
    def from_checkpoint(cls, ckpt: str | Path | Checkpoint) -> Tokenizer:
        """The tokenizer of an opened Checkpoint, or of a checkpoint folder (vocab checked)."""
        path = getattr(ckpt, "tokenizer_path", None)
        if path is None:
            from mixtral.checkpoint import CheckpointError, find_tokenizer
            from mixtral.config import load_model_config

            folder = getattr(ckpt, "path", ckpt)
            if not Path(folder).is_dir():
                raise CheckpointError(f"{folder}: not a checkpoint folder")
            path = find_tokenizer(folder, load_model_config(folder))
        return cls(path)

    @property
    def bos_id(self) -> int:
        return self._tok.bos_id

    @property
    def eos_id(self) -> int:
        return self._tok.eos_id

    @property
    def vocab_size(self) -> int:
        return self._tok.n_words

    @property
    def version(self) -> str:
        return self._tok.version.value

    def encode(self, text: str, bos: bool = True) -> list[int]:
        return self._tok.encode(text, bos=bos, eos=False)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`; special tokens (BOS, EOS, [INST], ...) decode to nothing."""
        ids = [int(i) for i in ids]
        bad = next((i for i in ids if not 0 <= i < self.vocab_size), None)
        if bad is not None:
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {self.vocab_size})")
        return self._tok.decode(ids)

    def piece(self, token_id: int) -> str:
        """The vocabulary entry itself, e.g. '▁Hello' or '<0xF0>' (for debugging and tests)."""
        return self._tok.id_to_piece(token_id)

    def incremental(self, context: Sequence[int] = ()) -> IncrementalDecoder:
        return IncrementalDecoder(self, context)

    # Chat templates ([INST] ... [/INST], tool calls) belong here, built on
    # `self.mistral.encode_chat_completion`, whose template depends on `self.version`.


class IncrementalDecoder:
    """Turns generated token ids, one at a time, into text deltas for streaming.

    Decoding tokens one by one is wrong twice over: SentencePiece drops the leading
    space of the first piece it decodes, and an emoji or CJK character split over several
    byte-fallback tokens decodes to U+FFFD until its last byte arrives. So each step
    decodes a short window (from the last emitted boundary) and emits only the suffix that
    the new token added, holding it back while it ends in an incomplete character.

    Without `context` the deltas concatenate to `decode(ids)`. With `context` (the last few
    prompt ids) they concatenate to the continuation of the prompt's text, so a first token
    '▁Hello' streams as ' Hello' the way it reads after the prompt.
    """

    def __init__(self, tokenizer: Tokenizer, context: Sequence[int] = ()):
        self._decode = tokenizer.decode
        self._ids = [int(i) for i in context][-_CONTEXT:]
        self._start = len(self._ids)
        self._prefix = 0  # window start: the ids whose text frames the delta
        self._read = len(self._ids)  # ids before this are already emitted (or context)

    @property
    def ids(self) -> list[int]:
        """The generated ids pushed so far (without the context)."""
        return self._ids[self._start :]

    def push(self, token_id: int) -> str:
        """Append one id; return the text it completes ('' while a character is incomplete)."""
        self._ids.append(int(token_id))
        prefix = self._decode(self._ids[self._prefix : self._read])
        text = self._decode(self._ids[self._prefix :])
        if len(text) > len(prefix) and not text.endswith(_REPLACEMENT):
            self._prefix, self._read = self._read, len(self._ids)
            return text[len(prefix) :]
        return ""

    def push_many(self, token_ids: Iterable[int]) -> str:
        return "".join(self.push(t) for t in token_ids)

    def flush(self) -> str:
        """At the end of the stream: whatever was held back, invalid bytes included."""
        prefix = self._decode(self._ids[self._prefix : self._read])
        text = self._decode(self._ids[self._prefix :])
        self._prefix, self._read = self._read, len(self._ids)
        return text[len(prefix) :]
