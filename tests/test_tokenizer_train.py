"""The CLIP-format BPE tokenizer trained on captions (latentdiff.training.tokenizer)."""

import json

import pytest

from latentdiff.training.tokenizer import BOS_TOKEN, EOS_TOKEN, byte_symbols, train_clip_tokenizer

CAPTIONS = [
    "a red circle to the left of a blue square",
    "two green triangles on a black background",
    "a yellow star above an orange circle",
    "three purple squares",
    "a pink triangle below a cyan star on a gray background",
] * 20


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    return folder, train_clip_tokenizer(CAPTIONS, folder, vocab_size=700, model_max_length=16)


def test_files_are_in_clip_layout(trained):
    folder, tok = trained
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    merges = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
    symbols = byte_symbols()
    assert len(set(symbols)) == 256
    # CLIP's order: 256 bytes, the same with </w>, merges in order, then the two special tokens last
    assert [t for t, i in sorted(vocab.items(), key=lambda kv: kv[1])][:512] == symbols + [s + "</w>" for s in symbols]
    assert merges[0] == "#version: 0.2"
    assert len(vocab) == 512 + len(merges) - 1 + 2 == len(tok)
    assert vocab[BOS_TOKEN] == len(vocab) - 2 and vocab[EOS_TOKEN] == len(vocab) - 1
    for line in merges[1:]:
        a, b = line.split(" ")
        assert a + b in vocab


def test_round_trip_and_whole_words(trained):
    _, tok = trained
    for caption in set(CAPTIONS):
        (ids,) = tok.token_ids([caption])
        assert tok.decode(ids) == caption
        assert len(ids) == len(caption.split())  # frequent words became single tokens
    assert tok.decode(tok.token_ids(["A  RED\tCircle"])[0]) == "a red circle"


def test_unknown_unicode_still_tokenizes(trained):
    _, tok = trained
    text = "zebra 日本 😀 ωmega"
    (ids,) = tok.token_ids([text])
    assert tok.eos_token_id not in ids  # byte fallback, never the unknown token (<|endoftext|> in CLIP)
    assert tok.decode(ids) == text


def test_padding_and_special_ids(trained):
    _, tok = trained
    ids = tok(["a red circle"])[0].tolist()
    assert len(ids) == 16
    assert tok.pad_token_id == tok.eos_token_id == len(tok) - 1 and tok.bos_token_id == len(tok) - 2
    assert ids[:5] == [tok.bos_token_id, *tok.token_ids(["a red circle"])[0], tok.eos_token_id]
    assert ids[5:] == [tok.pad_token_id] * 11
    with pytest.warns(UserWarning, match="truncated; dropped: 'circle circle"):
        long = tok([" ".join(["circle"] * 40)])[0].tolist()
    assert len(long) == 16 and long[-1] == tok.eos_token_id


def test_loads_with_clip_tokenizer(trained):
    from transformers import CLIPTokenizer

    folder, tok = trained
    again = CLIPTokenizer.from_pretrained(str(folder))
    assert again.model_max_length == 16
    text = "two green triangles, 日本"
    ours = tok([text])[0].tolist()
    assert again(text, padding="max_length", max_length=16).input_ids == ours
    # from the two CLIP files alone, as older tooling reads them
    plain = CLIPTokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"))
    assert plain(text, padding="max_length", max_length=16).input_ids == ours


def test_vocab_size_is_an_upper_bound(tmp_path):
    tok = train_clip_tokenizer(CAPTIONS, tmp_path / "a", vocab_size=520, min_frequency=1)
    assert len(tok) == 520
    big = train_clip_tokenizer(CAPTIONS, tmp_path / "b", vocab_size=50_000)
    assert 520 < len(big) < 1000  # the captions run out of pairs long before


def test_too_small_vocab_is_refused(tmp_path):
    with pytest.raises(ValueError, match="vocab_size must be >= 514"):
        train_clip_tokenizer(CAPTIONS, tmp_path, vocab_size=300)
    assert not (tmp_path / "vocab.json").exists()
