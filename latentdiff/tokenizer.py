"""CLIP's byte-level BPE tokenizer from a folder's vocab.json + merges.txt, on the `tokenizers` library.

It splits and merges exactly as transformers' CLIPTokenizer (NFC, whitespace collapse, lowercase, CLIP's
word regex, byte-level symbols, "</w>" word ends; tests compare the two), without importing transformers,
whose import costs seconds of start-up.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch

from latentdiff.callers import user_stacklevel
from latentdiff.config import read_json

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"
DEFAULT_MAX_LENGTH = 77  # CLIP's context window, used when a folder does not say
# CLIP's word splitter: its special tokens, contractions, letter runs, single digits, runs of other symbols.
CLIP_SPLIT_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def clip_bpe(vocab: dict[str, int] | None = None, merges: list[tuple[str, str]] | None = None):
    """A `tokenizers.Tokenizer` with CLIP's normaliser, pre-tokeniser and BPE model (empty if no vocab)."""
    from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import BPE

    if vocab is None:
        model = BPE(end_of_word_suffix=END_OF_WORD, continuing_subword_prefix="")
    else:
        model = BPE(
            vocab=vocab,
            merges=merges or [],
            continuing_subword_prefix="",
            end_of_word_suffix=END_OF_WORD,
            fuse_unk=False,
            unk_token=EOS_TOKEN,
        )
    tok = Tokenizer(model)
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(CLIP_SPLIT_PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    return tok


def read_merges(path: Path) -> list[tuple[str, str]]:
    """merges.txt: an optional "#version" line, then one "a b" pair per line."""
    pairs = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line or (number == 1 and line.startswith("#version")):
            continue
        parts = line.split(" ")
        if len(parts) != 2:
            raise ValueError(f"{path}:{number}: expected two symbols separated by one space, got {line!r}")
        pairs.append((parts[0], parts[1]))
    return pairs


def read_tokenizer_json(path: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The vocab and merges of a `tokenizers` file, if it holds CLIP's kind of BPE (else a clear error)."""
    model = read_json(path).get("model") or {}
    if model.get("type") != "BPE" or model.get("end_of_word_suffix") != END_OF_WORD:
        raise ValueError(f"{path} is not a CLIP tokenizer (a BPE model with {END_OF_WORD!r} word ends)")
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return model["vocab"], merges


def _token_name(value: Any) -> str | None:
    # tokenizer_config.json stores special tokens as strings or as AddedToken dicts {"content": ...}.
    if isinstance(value, dict):
        return value.get("content")
    return value


class CLIPTokenizer:
    """Prompts -> fixed-length id windows: BOS, the prompt's tokens (truncated), EOS, then padding."""

    def __init__(
        self,
        vocab: dict[str, int],
        merges: list[tuple[str, str]],
        model_max_length: int = DEFAULT_MAX_LENGTH,
        pad_token: str = EOS_TOKEN,
    ):
        for token in (BOS_TOKEN, EOS_TOKEN, pad_token):
            if token not in vocab:
                raise ValueError(f"tokenizer vocabulary has no {token!r} token")
        if model_max_length < 2:
            raise ValueError(f"model_max_length must be >= 2 (start and end tokens), got {model_max_length}")
        self.vocab, self.merges = vocab, merges
        self.model_max_length = model_max_length
        self.pad_token = pad_token
        self.bos_token_id, self.eos_token_id, self.pad_token_id = vocab[BOS_TOKEN], vocab[EOS_TOKEN], vocab[pad_token]
        self._tok = clip_bpe(vocab, merges)
        # Written literally in a prompt, the special tokens are those tokens, as in CLIPTokenizer; that holds
        # for the pad token too (SD 2.x pads with "!", so a "!" in its prompts is that token, not "!</w>").
        self._tok.add_special_tokens(list(dict.fromkeys([BOS_TOKEN, EOS_TOKEN, pad_token])))
        self._symbols: list[str] | None = None

    @classmethod
    def from_folder(cls, folder: str | Path) -> CLIPTokenizer:
        """vocab.json + merges.txt (CLIP's files), else the BPE model inside tokenizer.json (transformers 5)."""
        folder = Path(folder)
        if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            vocab = read_json(folder / "vocab.json")
            merges = read_merges(folder / "merges.txt")
        elif (folder / "tokenizer.json").is_file():
            vocab, merges = read_tokenizer_json(folder / "tokenizer.json")
        else:
            raise FileNotFoundError(
                f"{folder} holds no CLIP tokenizer: expected vocab.json + merges.txt, or tokenizer.json"
            )
        config: dict[str, Any] = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the second wins, as in transformers
            if (folder / name).is_file():
                config.update(read_json(folder / name))
        max_length = config.get("model_max_length")
        if not isinstance(max_length, int) or max_length > 1_000_000:  # transformers' "no limit" is 1e30
            max_length = DEFAULT_MAX_LENGTH
        return cls(vocab, merges, max_length, _token_name(config.get("pad_token")) or EOS_TOKEN)

    def __len__(self) -> int:
        return len(self.vocab)

    def token_ids(self, prompts: list[str]) -> list[list[int]]:
        """Each prompt's tokens, untruncated, without BOS/EOS."""
        return [e.ids for e in self._tok.encode_batch(prompts, add_special_tokens=False)]

    def __call__(self, prompts: list[str] | str, warn: bool = True) -> torch.Tensor:
        """(B, model_max_length) int64 ids; with `warn`, a too-long prompt warns and names the words cut off."""
        if isinstance(prompts, str):
            prompts = [prompts]
        keep = self.model_max_length - 2
        rows = []
        for prompt, tokens in zip(prompts, self.token_ids(prompts)):
            if len(tokens) > keep and warn:
                warnings.warn(
                    f"prompt is longer than the text encoder's {self.model_max_length} tokens and was truncated; "
                    f"dropped: {self.decode(tokens[keep:])!r} (prompt starts {prompt[:40]!r})",
                    stacklevel=user_stacklevel(),
                )
            row = [self.bos_token_id, *tokens[:keep], self.eos_token_id]
            rows.append(row + [self.pad_token_id] * (self.model_max_length - len(row)))
        return torch.tensor(rows, dtype=torch.long)

    def tokens(self, ids: list[int]) -> list[str]:
        if self._symbols is None:
            self._symbols = [""] * (max(self.vocab.values()) + 1)
            for token, i in self.vocab.items():
                self._symbols[i] = token
        return [self._symbols[i] for i in ids]

    def decode(self, ids: list[int]) -> str:
        """Text of token ids (specials dropped), words separated by single spaces."""
        from tokenizers.decoders import ByteLevel

        specials = {self.bos_token_id, self.eos_token_id, self.pad_token_id}
        text = ByteLevel().decode(self.tokens([i for i in ids if i not in specials]))
        return text.replace(END_OF_WORD, " ").strip()

    def save(self, folder: str | Path) -> None:
        """vocab.json + merges.txt + tokenizer_config.json, readable by transformers' CLIPTokenizer too."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "vocab.json").write_text(json.dumps(self.vocab, ensure_ascii=False), encoding="utf-8")
        lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in self.merges]
        (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
        special = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN, "pad_token": self.pad_token}
        config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": self.model_max_length, **special}
        for name, data in (("tokenizer_config.json", config), ("special_tokens_map.json", special)):
            (folder / name).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
