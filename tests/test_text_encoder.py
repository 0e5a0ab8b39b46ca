"""latentdiff's own CLIP tokenizer and text transformer against transformers' CLIPTokenizer / CLIPTextModel."""

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from latentdiff.clip import CLIPTextEncoder, CLIPTextSettings
from latentdiff.config import UnsupportedConfigError
from latentdiff.testing.tiny import byte_vocab_tokenizer
from latentdiff.tokenizer import CLIPTokenizer

BUNDLED_TOKENIZER = "weights/shapes-tiny/tokenizer"
PROMPTS = [
    "a red circle",
    "Three BLUE squares!!",
    "  tabs\tand\nnew\r\nlines  ",
    "café naïve Ünïcødé 😀 ✨",
    "don't it's we're I'll they'd",
    "1234 56.7 -- x_y (a:1.2) [b]",
    "<|startoftext|>hello<|endoftext|> world",
    "",
    "a" * 200,
    "a pink star above a cyan circle on a black background " * 3,
    "ﬁ ligature Ａ full width",
    "日本語のテキスト",
    "e\u0301 combining",
]


def transformers_ids(folder, prompts, max_length):
    from transformers import CLIPTokenizer as Reference

    ref = Reference.from_pretrained(str(folder))
    return ref(prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt").input_ids


@pytest.fixture(scope="module", params=["bundled", "bytes", "sd2_pad"])
def tokenizer_folder(request, tmp_path_factory):
    if request.param == "bundled":
        return BUNDLED_TOKENIZER
    folder = tmp_path_factory.mktemp(request.param)
    byte_vocab_tokenizer(folder, model_max_length=20)
    if request.param == "sd2_pad":  # SD 2.x pads with "!" (id 0), not <|endoftext|>
        config = json.loads((folder / "tokenizer_config.json").read_text())
        config["pad_token"] = "!"
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def test_tokenizer_matches_transformers(tokenizer_folder):
    ours = CLIPTokenizer.from_folder(tokenizer_folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = ours(PROMPTS)
    expected = transformers_ids(tokenizer_folder, PROMPTS, ours.model_max_length)
    assert got.shape == expected.shape
    for prompt, a, b in zip(PROMPTS, got, expected):
        assert a.tolist() == b.tolist(), prompt


def test_tokenizer_reads_pad_and_window_from_config(tokenizer_folder):
    tok = CLIPTokenizer.from_folder(tokenizer_folder)
    config = json.loads((Path(tokenizer_folder) / "tokenizer_config.json").read_text())
    assert tok.model_max_length == config["model_max_length"]
    assert tok.pad_token_id == tok.vocab[config["pad_token"]]


def test_truncation_warning_names_the_dropped_words():
    tok = CLIPTokenizer.from_folder(BUNDLED_TOKENIZER)
    prompt = "a red circle " * 20 + "zebra crossing"
    with pytest.warns(UserWarning, match=r"truncated; dropped: '.*zebra crossing'"):
        ids = tok([prompt])
    assert ids.shape == (1, tok.model_max_length) and ids[0, -1] == tok.eos_token_id
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tok([prompt], warn=False)  # training batches: no warning per caption


def test_save_round_trip_loads_in_transformers(tmp_path):
    tok = CLIPTokenizer.from_folder(BUNDLED_TOKENIZER)
    tok.save(tmp_path)
    again = CLIPTokenizer.from_folder(tmp_path)
    assert torch.equal(again(PROMPTS[:6]), tok(PROMPTS[:6]))
    assert torch.equal(transformers_ids(tmp_path, PROMPTS[:6], tok.model_max_length), tok(PROMPTS[:6]))


def test_tokenizer_json_alone_is_enough(tmp_path):
    """diffusers/transformers 5 save only tokenizer.json; the same ids come from its BPE model."""
    from transformers import CLIPTokenizer as Reference

    Reference.from_pretrained(BUNDLED_TOKENIZER).save_pretrained(str(tmp_path))
    for name in ("vocab.json", "merges.txt"):
        (tmp_path / name).unlink(missing_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert torch.equal(
            CLIPTokenizer.from_folder(tmp_path)(PROMPTS), CLIPTokenizer.from_folder(BUNDLED_TOKENIZER)(PROMPTS)
        )


def test_tokenizer_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="expected vocab.json"):
        (tmp_path / "vocab.json").write_text("{}")
        CLIPTokenizer.from_folder(tmp_path)
    (tmp_path / "merges.txt").write_text("#version: 0.2\na b c\n")
    with pytest.raises(ValueError, match=r"merges.txt:2: expected two symbols"):
        CLIPTokenizer.from_folder(tmp_path)


def reference_pair(hidden_act, layers=3):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=300,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=20,
        hidden_act=hidden_act,
        bos_token_id=298,
        eos_token_id=299,
        pad_token_id=299,
    )
    torch.manual_seed(0)
    ref = CLIPTextModel(config).eval()
    raw = config.to_dict()
    ours = CLIPTextEncoder(CLIPTextSettings.from_dict(raw), raw).eval()
    state = {k.removeprefix("text_model."): v for k, v in ref.state_dict().items() if "position_ids" not in k}
    ours.load_state_dict(state, strict=True)
    return ref, ours


@pytest.mark.parametrize("hidden_act", ["quick_gelu", "gelu"])
@pytest.mark.parametrize("clip_skip", [0, 1, 2])
def test_text_encoder_matches_transformers(hidden_act, clip_skip):
    ref, ours = reference_pair(hidden_act)
    ids = torch.randint(0, 300, (3, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = ref(ids, output_hidden_states=True)
        if clip_skip == 0:
            expected = out.last_hidden_state
        else:  # diffusers' clip skip: an earlier layer's output through the final layer norm
            final_norm = getattr(ref, "text_model", ref).final_layer_norm
            expected = final_norm(out.hidden_states[-(clip_skip + 1)])
        got = ours(ids, clip_skip=clip_skip)
    assert torch.allclose(got, expected, atol=1e-6, rtol=0)


def test_text_encoder_gradients_and_checkpointing_agree():
    _, ours = reference_pair("quick_gelu")
    ids = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(2))
    ours.train()
    ours(ids).square().mean().backward()
    plain = [p.grad.clone() for p in ours.parameters()]
    ours.zero_grad()
    ours.enable_gradient_checkpointing()
    ours(ids).square().mean().backward()
    for a, p in zip(plain, ours.parameters()):
        assert torch.allclose(a, p.grad, atol=1e-6)


def test_text_config_errors():
    with pytest.raises(UnsupportedConfigError, match="hidden_act 'relu'"):
        CLIPTextSettings.from_dict({"hidden_act": "relu"})
    with pytest.raises(UnsupportedConfigError, match="unknown config key 'rotary'"):
        CLIPTextSettings.from_dict({"rotary": True})
    # a mistyped or zero size is named, as for the U-Net's and VAE's configs (not a TypeError, ZeroDivisionError)
    with pytest.raises(ValueError, match="hidden_size = '512' is not an integer"):
        CLIPTextSettings.from_dict({"hidden_size": "512"})
    with pytest.raises(ValueError, match="num_attention_heads must be at least 1, got 0"):
        CLIPTextSettings.from_dict({"num_attention_heads": 0})
    encoder = CLIPTextEncoder(
        CLIPTextSettings(vocab_size=10, hidden_size=8, num_attention_heads=2, num_hidden_layers=2)
    )
    with pytest.raises(ValueError, match=r"clip_skip=2 is out of range; this text encoder has 2 layers"):
        encoder(torch.zeros(1, 4, dtype=torch.long), clip_skip=2)


def test_generating_does_not_import_transformers():
    """transformers' import costs seconds of start-up; inference must not need it."""
    code = (
        "import sys; from latentdiff.pipeline import LatentDiffusionPipeline as P; "
        "P.from_pretrained()('a red circle', steps=1, seed=0, progress=False); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('transformers', 'diffusers')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
