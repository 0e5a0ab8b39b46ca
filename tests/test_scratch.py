"""A fresh model folder from a recipe (latentdiff.training.scratch)."""

import json

import pytest
import torch
from safetensors.torch import load_file

from latentdiff.training.scratch import RecipeError, init_model_folder, main

CAPTIONS = ["a red circle", "two blue squares", "a green star above a yellow triangle"] * 10


def tiny_recipe():
    return {
        "name": "tiny-scratch",
        "seed": 3,
        "resolution": 32,
        "tokenizer": {"vocab_size": 600, "model_max_length": 12, "min_frequency": 1},
        "text_encoder": {
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "projection_dim": 16,
        },
        "vae": {
            "down_block_types": ["DownEncoderBlock2D"] * 2,
            "up_block_types": ["UpDecoderBlock2D"] * 2,
            "block_out_channels": [8, 8],
            "norm_num_groups": 4,
            "latent_channels": 4,
        },
        "unet": {
            "block_out_channels": [8, 16],
            "layers_per_block": 1,
            "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
            "attention_head_dim": 2,
            "norm_num_groups": 4,
        },
        "scheduler": {
            "num_train_timesteps": 1000,
            "beta_start": 0.00085,
            "beta_end": 0.012,
            "beta_schedule": "scaled_linear",
            "prediction_type": "epsilon",
            "steps_offset": 1,
        },
        "defaults": {"sampler": "euler", "steps": 3, "guidance_scale": 4.0, "height": 32, "width": 32},
    }


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return init_model_folder(tiny_recipe(), CAPTIONS, None, tmp_path_factory.mktemp("m") / "init")


def test_folder_loads_and_generates_with_stored_defaults(folder):
    from latentdiff.pipeline import LatentDiffusionPipeline

    pipe = LatentDiffusionPipeline.from_pretrained(folder)
    assert pipe.model_name == "tiny-scratch"
    assert pipe.defaults["sampler"] == "euler" and pipe.defaults["steps"] == 3
    assert pipe.text_encoder.config.vocab_size == len(pipe.tokenizer)
    assert pipe.text_encoder.config.max_position_embeddings == pipe.tokenizer.model_max_length == 12
    assert pipe.text_encoder.config_dict()["eos_token_id"] == pipe.tokenizer.eos_token_id
    assert pipe.unet.config.cross_attention_dim == 16 and pipe.unet.config.sample_size == 16
    (image,) = pipe("a red circle", seed=0, progress=False)
    assert image.size == (32, 32)


def test_same_recipe_same_weights_and_global_rng_untouched(folder, tmp_path):
    torch.manual_seed(123)
    before = torch.get_rng_state()
    again = init_model_folder(tiny_recipe(), CAPTIONS, None, tmp_path / "again")
    assert torch.equal(torch.get_rng_state(), before)
    for part, name in [("unet", "diffusion_pytorch_model"), ("text_encoder", "model")]:
        a, b = (
            load_file(folder / part / f"{name}.safetensors"),
            load_file(again / part / f"{name}.safetensors"),
        )
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_diffusers_loads_the_folder_and_agrees(folder):
    from diffusers import UNet2DConditionModel

    from latentdiff.pipeline import LatentDiffusionPipeline

    ours = LatentDiffusionPipeline.from_pretrained(folder)
    theirs = UNet2DConditionModel.from_pretrained(folder / "unet").eval()
    x, ctx = torch.randn(2, 4, 16, 16), torch.randn(2, 12, 16)
    with torch.no_grad():
        torch.testing.assert_close(
            ours.unet(x, torch.tensor([10, 500]), ctx), theirs(x, torch.tensor([10, 500]), ctx).sample
        )


@pytest.mark.slow
def test_stable_diffusion_pipeline_loads_the_folder(folder):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    out = pipe("a red circle", num_inference_steps=2, output_type="np", height=32, width=32)
    assert out.images.shape == (1, 32, 32, 3)


def test_trained_vae_is_taken_as_is(tmp_path):
    from latentdiff.training.vae_train import save_vae
    from latentdiff.vae import VAE, VAEConfig

    torch.manual_seed(7)
    vae = VAE(VAEConfig.from_dict(tiny_recipe()["vae"]))
    vae.config.scaling_factor = 0.5
    save_vae(vae, tmp_path / "run" / "vae")
    out = init_model_folder(tiny_recipe(), CAPTIONS, tmp_path / "run", tmp_path / "m")  # a folder holding vae/
    assert json.loads((out / "vae" / "config.json").read_text())["scaling_factor"] == 0.5
    saved = load_file(out / "vae" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(saved[k], v) for k, v in vae.state_dict().items())


def test_inconsistent_recipe_is_refused(tmp_path):
    recipe = tiny_recipe()
    recipe["unet"]["cross_attention_dim"] = 32
    with pytest.raises(RecipeError, match="cross_attention_dim .32. must equal text_encoder hidden_size .16."):
        init_model_folder(recipe, CAPTIONS, None, tmp_path / "m")
    recipe["unet"]["cross_attention_dim"] = 16
    recipe["defaults"]["steps"] = 0
    with pytest.raises(RecipeError, match="recipe: defaults: steps = 0 is not a positive integer"):
        init_model_folder(recipe, CAPTIONS, None, tmp_path / "m")
    recipe["defaults"] = {"sampler": "euler", "cfg": 3}
    with pytest.raises(RecipeError, match="recipe: defaults: unknown setting 'cfg'"):
        init_model_folder(recipe, CAPTIONS, None, tmp_path / "m")
    del recipe["defaults"]
    with pytest.raises(RecipeError, match="missing \\['defaults'\\]"):
        init_model_folder(recipe, CAPTIONS, None, tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_cli(tmp_path, capsys):
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps(tiny_recipe()))
    assert main(["--recipe", str(recipe), "--out", str(tmp_path / "m"), "--num-captions", "50"]) == 0
    assert (tmp_path / "m" / "model_index.json").is_file()
    assert main(["--recipe", str(recipe), "--vae", str(tmp_path / "nothing"), "--out", str(tmp_path / "n")]) == 1
    assert "no trained VAE" in capsys.readouterr().err
    assert not (tmp_path / "n").exists()


def _set(path, value):
    def change(recipe):
        *parents, key = path.split(".")
        section = recipe
        for name in parents:
            section = section[name]
        section[key] = value

    return change


@pytest.fixture
def no_slow_work(monkeypatch):
    """Every user mistake must be found before the tokenizer is trained (build is the slow part)."""

    def build(*args, **kwargs):
        raise AssertionError("the slow work started before the mistake was found")

    monkeypatch.setattr("latentdiff.training.scratch.build", build)


def _refused(capsys, argv, expected):
    """main(argv) fails with one line, `expected` (or its start, when it ends in ...), exit 1, no traceback."""
    assert main(argv) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and "Traceback" not in captured.err
    if expected.endswith("..."):  # the start of the message
        assert captured.err.startswith(f"error: {expected.removesuffix('...')}")
    else:
        assert captured.err == f"error: {expected}\n"


@pytest.mark.parametrize(
    "change, message",
    [
        (_set("text_encoder", [1, 2]), "text_encoder must be a JSON object ({...}), got [1, 2]"),
        (_set("unet", None), "unet must be a JSON object ({...}), got None"),
        (_set("tokenizer.vocab_size", "1024"), "tokenizer: vocab_size = '1024' is not a positive integer"),
        (_set("tokenizer.vocab_size", 100), "tokenizer: vocab_size must be >= 514..."),
        (_set("tokenizer.num_captions", -5), "tokenizer: num_captions = -5 is not a positive integer"),
        (_set("tokenizer.vocab", 600), "tokenizer: unknown key 'vocab'; the keys are..."),
        (_set("resolution", "64"), "resolution = '64' is not a positive integer (pixels)"),
        (_set("resolution", 33), "resolution = 33 is not a multiple of 2, the VAE's downsampling factor; ..."),
        (_set("seed", 1.5), "seed = 1.5 is not an integer"),
        (_set("text_encoder.num_hidden_layers", "3"), "text_encoder: num_hidden_layers = '3' is not an integer"),
        (_set("text_encoder.hidden_size", "16"), "text_encoder: hidden_size = '16' is not an integer"),
        (_set("text_encoder.num_attention_heads", 0), "text_encoder: num_attention_heads = 0 is not a positive..."),
        (_set("text_encoder.foo", 1), "text_encoder: unknown config key 'foo' (value 1)..."),
        (_set("unet.foo", 1), "unet: unknown config key 'foo' (value 1); latentdiff does not support it"),
        (_set("unet.layers_per_block", "1"), "unet: layers_per_block = '1' is not..."),
        (_set("unet.sample_size", 8), "unet: sample_size = 8 does not match resolution 32 / 2..."),
        (_set("vae.latent_channels", "4"), "vae: latent_channels = '4' is not an integer"),
        (_set("scheduler.prediction_type", "noise"), "scheduler: ..."),
        (_set("defaults.steps", 0), "defaults: steps = 0 is not a positive integer"),
    ],
)
def test_cli_names_the_recipe_key(tmp_path, capsys, no_slow_work, change, message):
    recipe = tiny_recipe()
    change(recipe)
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps(recipe))
    _refused(capsys, ["--recipe", str(path), "--out", str(tmp_path / "m")], f"{path}: {message}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.json"]


def test_cli_refuses_a_vae_folder_that_is_not_a_vae(folder, tmp_path, capsys, no_slow_work):
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps(tiny_recipe()))
    unet = folder / "unet"
    argv = ["--recipe", str(recipe), "--vae", str(unet), "--out", str(tmp_path / "m")]
    _refused(capsys, argv, f"{unet} is not a VAE folder: its config.json is a UNet2DConditionModel's...")
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("kind", ["file", "folder"])
def test_cli_refuses_an_out_it_would_overwrite(tmp_path, capsys, no_slow_work, kind):
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps(tiny_recipe()))
    out, mine = tmp_path / "out", tmp_path / "out" / "mine.txt"
    if kind == "file":
        out.write_text("mine")
        what = "it is a file, not a folder"
    else:
        out.mkdir()
        mine.write_text("mine")
        what = "it is a folder with other files in it and no latentdiff.json of an earlier save"
    _refused(capsys, ["--recipe", str(recipe), "--out", str(out)], f"cannot save to {out}: {what}...")
    assert (out if kind == "file" else mine).read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "recipe.json"]
    if kind == "folder":
        assert [p.name for p in out.iterdir()] == ["mine.txt"]


@pytest.mark.parametrize("count", ["-5", "0", "ten"])
def test_cli_num_captions_must_be_positive(tmp_path, capsys, no_slow_work, count):
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps(tiny_recipe()))
    with pytest.raises(SystemExit) as exit_:
        main(["--recipe", str(recipe), "--out", str(tmp_path / "m"), "--num-captions", count])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"error: argument --num-captions: '{count}' is not a positive integer; leave it out" in err
    assert "Traceback" not in err and not (tmp_path / "m").exists()


def test_cli_replaces_an_earlier_save(tmp_path, capsys):
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps(tiny_recipe()))
    argv = ["--recipe", str(recipe), "--out", str(tmp_path / "m"), "--num-captions", "5"]
    assert main(argv) == 0 and main(argv) == 0
    assert (tmp_path / "m" / "model_index.json").is_file()
