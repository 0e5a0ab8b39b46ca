"""Training the autoencoder from scratch (latentdiff.training.vae_train, training/train_vae.py)."""

import json

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

from latentdiff.training.vae_train import edge_l1, foreground_mask, latent_scaling_factor, main, vae_loss, weighted_l1
from latentdiff.vae import VAE, VAEConfig

TINY = {
    "down_block_types": ["DownEncoderBlock2D"] * 2,
    "up_block_types": ["UpDecoderBlock2D"] * 2,
    "block_out_channels": [8, 8],
    "norm_num_groups": 4,
    "latent_channels": 4,
    "mid_block_add_attention": False,
}


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "vae.json"
    path.write_text(json.dumps({"name": "recipe", "vae": TINY}))  # a recipe with a "vae" section
    return path


def run(config_file, out, *extra):
    args = ["--config", str(config_file), "--output-dir", str(out), "--resolution", "16", "--batch-size", "2"]
    args += ["--scale-samples", "4", "--shapes-count", "64", "--lr-warmup-steps", "1", *extra]
    return main(args)


def test_edge_loss_punishes_blur_more_than_pixel_loss():
    sharp = torch.zeros(1, 3, 16, 16)
    sharp[..., :, 8:] = 1.0
    blurred = sharp.clone()
    blurred[..., :, 7], blurred[..., :, 8] = 0.25, 0.75  # the step spread over two pixels
    assert edge_l1(sharp, sharp) == 0
    pixel = (blurred - sharp).abs().mean()
    assert edge_l1(blurred, sharp) > pixel  # every pixel of the ramp and the step pays


def small_shape_scene() -> torch.Tensor:
    """A gray 16x16 image with one purple 2x2 square: 4 of 256 pixels are foreground."""
    x = torch.zeros(1, 3, 16, 16)
    x[0, :, 5:7, 9:11] = torch.tensor([0.4, -0.6, 0.5])[:, None, None]
    return x


def test_foreground_mask_marks_the_shape_not_the_background():
    mask = foreground_mask(small_shape_scene())
    assert mask.shape == (1, 1, 16, 16)
    assert mask.sum() == 4 and mask[0, 0, 5:7, 9:11].all()


def test_foreground_weight_makes_a_missing_small_shape_cost_more():
    x = small_shape_scene()
    lost = torch.zeros_like(x)  # the decoder drew the background only
    plain = weighted_l1(lost, x, 0.0)
    assert plain == pytest.approx(F.l1_loss(lost, x).item())
    weighted = weighted_l1(lost, x, 8.0)
    # a weighted mean: a perfect image is still 0; the 4 shape pixels count 9x among 252 + 4 * 9 weights
    assert weighted_l1(x, x, 8.0) == 0
    assert weighted / plain == pytest.approx(9 * 256 / (252 + 4 * 9))


def test_loss_falls_on_a_fixed_batch():
    torch.manual_seed(0)
    vae = VAE(VAEConfig.from_dict(TINY))
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-2)
    losses = []
    for _ in range(20):
        recon, post = vae(x, sample_posterior=True, generator=torch.Generator().manual_seed(0))
        loss, parts = vae_loss(recon, x, post, kl_weight=1e-6, edge_weight=1.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert set(parts) == {"rec", "edge", "kl"}
    assert losses[-1] < 0.6 * losses[0]


def test_scaling_factor_gives_unit_variance_latents():
    torch.manual_seed(0)
    vae = VAE(VAEConfig.from_dict(TINY)).eval()
    x = torch.rand(8, 3, 16, 16) * 2 - 1
    s = latent_scaling_factor(vae, x, batch_size=3, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        z = vae.encode(x).sample(torch.Generator().manual_seed(1))
    assert (z * s).std().item() == pytest.approx(1.0, rel=0.1)


def test_run_writes_a_vae_that_latentdiff_and_diffusers_load(config_file, tmp_path, capsys):
    from diffusers import AutoencoderKL

    from latentdiff.training.scratch import load_vae

    out = tmp_path / "run"
    assert run(config_file, out, "--max-steps", "2", "--validate-every", "2") == 0
    assert "scaling_factor" in capsys.readouterr().out
    config = json.loads((out / "vae" / "config.json").read_text())
    assert config["_class_name"] == "AutoencoderKL" and config["sample_size"] == 16
    assert config["scaling_factor"] != VAEConfig().scaling_factor and config["scaling_factor"] > 0
    for name in ("loss_curve.png", "losses.csv", "reconstructions.png", "validation/recon-000002.png"):
        assert (out / name).is_file(), name
    ours, theirs = load_vae(out), AutoencoderKL.from_pretrained(out / "vae").eval()
    assert theirs.config.scaling_factor == pytest.approx(config["scaling_factor"])
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(ours(x)[0], theirs(x).sample)


def test_resume_continues_exactly(config_file, tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    constant = ("--lr-scheduler", "constant")  # cosine would decay to 0 at each leg's own --max-steps
    assert run(config_file, straight, "--max-steps", "6", *constant) == 0
    assert run(config_file, split, "--max-steps", "3", "--checkpoint-every", "3", *constant) == 0
    assert (split / "checkpoint-3" / "COMPLETE").is_file()
    assert run(config_file, split, "--max-steps", "6", "--resume", "latest", *constant) == 0
    a = load_file(straight / "vae" / "diffusion_pytorch_model.safetensors")
    b = load_file(split / "vae" / "diffusion_pytorch_model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    losses = [line.split(",")[1] for line in (split / "losses.csv").read_text().splitlines()[1:]]
    assert len(losses) == 6


def test_decoder_only_keeps_the_encoder_and_scaling_factor(config_file, tmp_path):
    first, tuned = tmp_path / "first", tmp_path / "tuned"
    assert run(config_file, first, "--max-steps", "2") == 0
    args = ["--output-dir", str(tuned), "--init", str(first), "--decoder-only", "--max-steps", "3"]
    args += ["--resolution", "16", "--batch-size", "2", "--scale-samples", "4", "--shapes-count", "64"]
    assert main([*args, "--lr", "1e-2", "--ema"]) == 0
    a = load_file(first / "vae" / "diffusion_pytorch_model.safetensors")
    b = load_file(tuned / "vae" / "diffusion_pytorch_model.safetensors")
    encoder = [k for k in a if k.startswith(("encoder.", "quant_conv."))]
    decoder = [k for k in a if k.startswith(("decoder.", "post_quant_conv."))]
    assert encoder and decoder and len(encoder) + len(decoder) == len(a)
    assert all(torch.equal(a[k], b[k]) for k in encoder)
    assert sum(not torch.equal(a[k], b[k]) for k in decoder) > len(decoder) // 2
    config_a, config_b = (json.loads((d / "vae" / "config.json").read_text()) for d in (first, tuned))
    assert config_b == config_a  # the scaling factor (and all else) kept


def test_image_folder_without_captions(config_file, tmp_path):
    data = tmp_path / "images"
    data.mkdir()
    for i, color in enumerate(["red", "blue", "green"]):
        Image.new("RGB", (20, 24), color).save(data / f"{i}.png")
    (data / "broken.png").write_bytes(b"not a png")
    assert run(config_file, tmp_path / "out", "--data", str(data), "--max-steps", "1") == 0
    assert (tmp_path / "out" / "vae" / "config.json").is_file()


def test_user_errors(config_file, tmp_path, capsys):
    assert run(config_file, tmp_path / "a", "--max-steps", "1", "--resume", str(tmp_path / "nope")) == 1
    assert "no such checkpoint folder" in capsys.readouterr().err
    assert run(config_file, tmp_path / "b", "--data", str(tmp_path / "missing"), "--max-steps", "1") == 1
    assert "data folder not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run(config_file, tmp_path / "c", "--max-steps", "0")
    with pytest.raises(SystemExit):
        main(["--output-dir", str(tmp_path / "d"), "--decoder-only"])
    assert "--decoder-only needs --init" in capsys.readouterr().err
    assert main(["--output-dir", str(tmp_path / "e"), "--init", str(tmp_path / "nope")]) == 1
    assert "no trained VAE in" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--output-dir", str(tmp_path / "f"), "--learning-rate", "-1"])
    assert "--learning-rate must be a positive number, got -1.0" in capsys.readouterr().err
    (tmp_path / "g").write_text("precious")
    assert run(config_file, tmp_path / "g", "--max-steps", "1") == 1
    assert "is a file, not a folder" in capsys.readouterr().err and (tmp_path / "g").read_text() == "precious"


def test_resume_or_fresh_start_over_another_run(config_file, tmp_path, capsys):
    out = tmp_path / "o"
    assert run(config_file, out, "--max-steps", "2", "--checkpoint-every", "2") == 0
    assert run(config_file, out, "--max-steps", "2") == 1  # would overwrite checkpoint-2 and vae/
    assert f"--output-dir {out} already holds a run (checkpoint-2" in capsys.readouterr().err
    wider = tmp_path / "wider.json"
    wider.write_text(json.dumps({"vae": {**TINY, "latent_channels": 8}}))  # same names, other shapes
    assert run(wider, out, "--max-steps", "3", "--resume", "latest") == 1
    err = capsys.readouterr().err
    assert "does not match this VAE (was it made with another --config?)" in err and "another shape" in err
