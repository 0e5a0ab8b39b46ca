"""Train a CLIP-format byte-level BPE tokenizer on captions, with the `tokenizers` library.

The result is the same file format OpenAI's CLIP and Stable Diffusion ship (vocab.json + merges.txt), so
`transformers.CLIPTokenizer.from_pretrained(folder)` and diffusers' StableDiffusionPipeline load it as-is:

    vocab = 256 byte symbols, the same 256 with "</w>" (end of word), one token per merge, in merge
            order, then <|startoftext|> and <|endoftext|>   (CLIP's own layout)

Because every byte symbol is in the vocab, any text tokenizes (unseen unicode falls back to bytes). Text is
normalised and split exactly as CLIPTokenizer does it (NFC, whitespace collapse, lowercase, CLIP's regex,
byte-level), so the merges learnt here are the ones CLIPTokenizer applies.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from latentdiff.tokenizer import BOS_TOKEN, END_OF_WORD, EOS_TOKEN, CLIPTokenizer, clip_bpe


def byte_symbols() -> list[str]:
    """The 256 printable stand-ins byte-level BPE (GPT-2, CLIP) uses for bytes 0..255, in byte order."""
    from tokenizers.pre_tokenizers import ByteLevel

    # ByteLevel.alphabet() is unordered; rebuild the order from the GPT-2 rule instead of trusting it.
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table, shifted = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:  # bytes without a printable glyph map past 255, in order
            table[b] = chr(256 + shifted)
            shifted += 1
    symbols = [table[b] for b in range(256)]
    assert set(symbols) == set(ByteLevel.alphabet()), "byte-level alphabet differs from the GPT-2 rule"
    return symbols


def learn_merges(captions: Iterable[str], num_merges: int, min_frequency: int = 2) -> list[tuple[str, str]]:
    """The first `num_merges` BPE merges learnt on `captions` (fewer when the captions run out of pairs)."""
    from tokenizers.pre_tokenizers import ByteLevel
    from tokenizers.trainers import BpeTrainer

    if num_merges < 0:
        raise ValueError(f"num_merges must be >= 0, got {num_merges}")
    tok = clip_bpe()
    # The trainer's vocab counts the alphabet (<= 512 symbols with their "</w>" forms) before any merge;
    # ask for room for all of them plus the merges, then keep the first `num_merges` (BPE merges are
    # ordered, so any prefix of them is itself a valid merge list).
    trainer = BpeTrainer(
        vocab_size=512 + num_merges,
        min_frequency=min_frequency,
        initial_alphabet=ByteLevel.alphabet(),
        end_of_word_suffix=END_OF_WORD,
        show_progress=False,
        special_tokens=[],
    )
    tok.train_from_iterator(captions, trainer=trainer)
    merges = json.loads(tok.to_str())["model"]["merges"]
    pairs = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]
    return pairs[:num_merges]


def write_clip_tokenizer_files(folder: str | Path, merges: list[tuple[str, str]]) -> tuple[Path, Path]:
    """Write vocab.json and merges.txt in CLIP's layout for the given merges; returns their paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    symbols = byte_symbols()
    tokens = symbols + [s + END_OF_WORD for s in symbols]
    seen = set(tokens)
    for a, b in merges:
        if a + b not in seen:  # a merge's product is new in practice; guard the vocab's uniqueness anyway
            seen.add(a + b)
            tokens.append(a + b)
    tokens += [BOS_TOKEN, EOS_TOKEN]
    vocab_path, merges_path = folder / "vocab.json", folder / "merges.txt"
    vocab_path.write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    merges_path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return vocab_path, merges_path


def train_clip_tokenizer(
    captions: Iterable[str],
    folder: str | Path,
    vocab_size: int = 1024,
    model_max_length: int = 77,
    min_frequency: int = 2,
):
    """Train a CLIP-format BPE tokenizer on `captions`, save it in `folder` and return it.

    `vocab_size` counts everything (512 byte symbols, the merges, the two special tokens), as CLIP's
    49408 does; it is an upper bound, reached only when the captions hold enough distinct pairs.
    Pad is <|endoftext|>, as in CLIP and SD 1.x.
    """
    fixed = 512 + 2
    if vocab_size < fixed:
        raise ValueError(
            f"vocab_size must be >= {fixed} (256 bytes, 256 end-of-word bytes, 2 specials), got {vocab_size}"
        )
    if model_max_length < 2:
        raise ValueError(f"model_max_length must be >= 2 (start and end tokens), got {model_max_length}")
    merges = learn_merges(captions, vocab_size - fixed, min_frequency=min_frequency)
    vocab_path, _ = write_clip_tokenizer_files(folder, merges)
    vocab = json.loads(vocab_path.read_text(encoding="utf-8"))
    CLIPTokenizer(vocab, merges, model_max_length).save(folder)  # adds the configs with the window
    # Load from disk, as users will, so what we return is what they get.
    return CLIPTokenizer.from_folder(folder)
