"""Training runs on a tiny model: loss falls, exact resume, checkpoints, NaN handling, LoRA/EMA export, errors."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from train_helpers import train_argv, write_captioned_images

from latentdiff.training import checkpoint as ckpt
from latentdiff.training.cli import main


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread is several times faster than two."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from latentdiff.testing.tiny import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "model", "sd1")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_captioned_images(tmp_path_factory.mktemp("data"), 6, (20, 24), "picture")


def run(model_dir, data_dir, out, *extra, steps=3, batch=2, every=0):
    options = ("--max-steps", steps, "--batch-size", batch, "--checkpoint-every", every, "--report-to", "none")
    return main(train_argv(model_dir, data_dir, out, *options, *extra))


def unet_weights(folder):
    return load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors"))


def max_diff(a, b):
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


# ---- learning --------------------------------------------------------------------------------------------
def test_loss_falls_on_a_fixed_batch(model_dir):
    """Same images, captions, noise and timesteps every step: the U-Net must fit them."""
    from latentdiff.schedules import alphas_cumprod
    from latentdiff.training.losses import diffusion_loss
    from latentdiff.training.models import load_models

    torch.manual_seed(0)
    models = load_models(model_dir, "cpu")
    pipe = models.pipe
    pixels = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        latents = pipe.vae.encode(pixels).mean * pipe.vae.config.scaling_factor
        context = pipe.text_encoder(pipe.tokenizer(["a red circle", "a blue square"]))
    alphas = alphas_cumprod(pipe.scheduler_config)
    opt = torch.optim.AdamW(models.trainable_parameters("unet"), lr=1e-3)
    history = []
    for _ in range(40):
        loss = diffusion_loss(pipe.unet, latents, context, alphas, "epsilon", torch.Generator().manual_seed(0))
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(loss.item())
    assert history[-1] < 0.3 * history[0], history


def test_timestep_range_limits_the_noise_levels_trained():
    from latentdiff.training.losses import diffusion_loss

    seen = []

    def unet(noisy, t, context):
        seen.append(t.clone())
        return noisy

    latents, alphas = torch.zeros(64, 4, 2, 2), torch.linspace(0.99, 0.01, 1000)
    for lo, hi in ((700, 1000), (0, 1), (10, 12)):
        diffusion_loss(
            unet, latents, None, alphas, "epsilon", torch.Generator().manual_seed(0), timestep_range=(lo, hi)
        )
        assert lo <= seen[-1].min() and seen[-1].max() < hi
    diffusion_loss(unet, latents, None, alphas, "epsilon", torch.Generator().manual_seed(0))
    assert seen[-1].min() < 100 and seen[-1].max() >= 900  # the default: all of 0..999
    assert len(set(seen[0].tolist())) > 30  # uniform within the range, not one value


def test_timestep_range_share_mixes_the_band_with_the_whole_schedule():
    from latentdiff.training.losses import sample_timesteps

    def draw(share):
        return sample_timesteps(20000, 1000, torch.Generator().manual_seed(0), (700, 1000), share)

    in_band = (draw(0.5) >= 700).float().mean().item()
    # half from the band, half from all of T (of which 30 % lands in the band too): 0.5 + 0.5 * 0.3
    assert abs(in_band - 0.65) < 0.02, in_band
    assert draw(0.5).min() < 50  # the low noise levels are still trained
    assert draw(1.0).min() >= 700  # share 1: the band only, as --timestep-range alone
    assert torch.equal(draw(1.0), sample_timesteps(20000, 1000, torch.Generator().manual_seed(0), (700, 1000)))


def test_timestep_range_share_needs_a_range_and_a_fraction(capsys):
    from latentdiff.training.cli import build_parser, check_args

    parser = build_parser()
    for extra, message in (
        (["--timestep-range-share", "0.5"], "needs --timestep-range"),
        (["--timestep-range", "700", "1000", "--timestep-range-share", "1.5"], "must be in (0, 1]"),
    ):
        args = parser.parse_args(["--model", "m", "--data", "d", "--output-dir", "o", *extra])
        with pytest.raises(SystemExit):
            check_args(parser, args)
        assert message in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
def test_v_space_loss_is_the_v_error_of_the_same_prediction(kind):
    """Whatever the U-Net predicts, the weighted loss must equal the MSE of the v it implies (x_t fixed)."""
    from latentdiff.schedules import velocity_target
    from latentdiff.training.losses import diffusion_loss

    alphas = torch.linspace(0.999, 0.004, 1000)
    latents, seen = torch.randn(64, 4, 3, 3, generator=torch.Generator().manual_seed(1)), {}

    def unet(noisy, t, context):  # a wrong prediction, remembered to rebuild its v by hand
        seen.update(noisy=noisy, t=t, pred=0.5 * noisy + 0.1)
        return seen["pred"]

    loss = diffusion_loss(unet, latents, None, alphas, kind, torch.Generator().manual_seed(0), v_space=True)
    a = alphas[seen["t"]].view(-1, 1, 1, 1)
    noisy, pred = seen["noisy"], seen["pred"]
    if kind == "epsilon":
        x0, eps = (noisy - (1 - a).sqrt() * pred) / a.sqrt(), pred
    elif kind == "sample":
        x0, eps = pred, (noisy - a.sqrt() * pred) / (1 - a).sqrt()
    else:
        x0, eps = a.sqrt() * noisy - (1 - a).sqrt() * pred, (1 - a).sqrt() * noisy + a.sqrt() * pred
    true_eps = (noisy - a.sqrt() * latents) / (1 - a).sqrt()
    v_hat = velocity_target(x0, eps, seen["t"], alphas)
    v_true = velocity_target(latents, true_eps, seen["t"], alphas)
    expected = ((v_hat - v_true) ** 2).mean(dim=(1, 2, 3)).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)
    assert seen["t"].max() > 900  # the noisiest steps were in the draw (where the weights differ most)


def test_run_writes_final_model_that_loads_and_generates(model_dir, data_dir, tmp_path, capsys):
    from latentdiff.pipeline import LatentDiffusionPipeline

    out = tmp_path / "out"
    args = ["--validate-every", 2, "--validation-prompts", "a red circle", "a blue square", "--validation-steps", 2]
    assert run(model_dir, data_dir, out, *args, "--report-to", "tensorboard", steps=12) == 0
    assert "model in" in capsys.readouterr().out
    losses = [float(line.split(",")[1]) for line in (out / "losses.csv").read_text().splitlines()[1:]]
    assert len(losses) == 12 and sum(losses[-4:]) < sum(losses[:4])  # loss falls on the (small) data set
    assert (out / "loss_curve.png").is_file()
    grid = Image.open(out / "validation" / "step-000002.png")
    assert grid.size == (32, 16)
    assert list((out / "logs").rglob("events.out.tfevents.*"))
    pipe = LatentDiffusionPipeline.from_pretrained(out / "final")
    images = pipe(["a red circle"], seed=0, steps=2, height=16, width=16, progress=False)
    assert images[0].size == (16, 16)
    assert max_diff(unet_weights(out / "final"), unet_weights(model_dir)) > 0  # it did train


# ---- exact resume ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "extra",
    [
        ["--ema", "0.9", "--train-text-encoder", "--grad-accum", "2", "--lr-warmup-steps", "2", "--snr-gamma", "5"],
        ["--lora-rank", "4", "--noise-offset", "0.05"],
    ],
    ids=["full-ema-text-accum", "lora"],
)
def test_three_steps_then_resume_to_six_equals_six_straight(model_dir, data_dir, tmp_path, extra):
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert run(model_dir, data_dir, straight, *extra, steps=6, every=3) == 0
    assert run(model_dir, data_dir, split, *extra, steps=3, every=3) == 0
    assert run(model_dir, data_dir, split, *extra, "--resume", "latest", steps=6, every=3) == 0
    a, b = unet_weights(straight / "final"), unet_weights(split / "final")
    assert max_diff(a, b) <= 1e-6
    if "--train-text-encoder" in extra:
        te = [load_file(str(d / "final" / "text_encoder" / "model.safetensors")) for d in (straight, split)]
        assert max_diff(*te) <= 1e-6
    state = json.loads((split / "checkpoint-6" / "state.json").read_text())
    assert state["step"] == 6 and len(state["losses"]) == 6
    if "--lora-rank" not in extra:  # control: a different seed (data order, noise) is far from 1e-6
        other = tmp_path / "other"
        assert run(model_dir, data_dir, other, *extra, "--seed", "1", steps=6) == 0
        assert max_diff(a, unet_weights(other / "final")) > 1e-4


def test_final_holds_the_ema_weights(model_dir, data_dir, tmp_path):
    out = tmp_path / "out"
    assert run(model_dir, data_dir, out, "--ema", "0.5", steps=2, every=2) == 0
    shadow = load_file(str(out / "checkpoint-2" / "ema.safetensors"))
    trained = load_file(str(out / "checkpoint-2" / "trainable.safetensors"))
    final = unet_weights(out / "final")
    ema = {k.removeprefix("unet."): v for k, v in shadow.items()}
    assert max_diff(final, ema) == 0
    assert max_diff(final, {k.removeprefix("unet."): v for k, v in trained.items()}) > 0


def test_checkpoint_export_matches_final(model_dir, data_dir, tmp_path, capsys):
    from latentdiff.training.export import main as export_main

    out = tmp_path / "run"
    assert run(model_dir, data_dir, out, "--ema", "0.5", "--train-text-encoder", steps=2, every=2) == 0
    assert (
        export_main(
            ["--model", str(model_dir), "--checkpoint", str(out / "checkpoint-2"), "--out", str(tmp_path / "m")]
        )
        == 0
    )
    assert max_diff(unet_weights(tmp_path / "m"), unet_weights(out / "final")) == 0  # EMA weights, like final/
    te = [load_file(str(d / "text_encoder" / "model.safetensors")) for d in (tmp_path / "m", out / "final")]
    assert max_diff(*te) == 0
    assert (
        export_main(
            [
                "--model",
                str(model_dir),
                "--checkpoint",
                str(out / "checkpoint-2"),
                "--out",
                str(tmp_path / "raw"),
                "--no-ema",
            ]
        )
        == 0
    )
    assert max_diff(unet_weights(tmp_path / "raw"), unet_weights(out / "final")) > 0
    # the run folder names its newest complete checkpoint, as train.py --resume takes it
    assert export_main(["--model", str(model_dir), "--checkpoint", str(out), "--out", str(tmp_path / "x")]) == 0
    assert max_diff(unet_weights(tmp_path / "x"), unet_weights(tmp_path / "m")) == 0
    capsys.readouterr()


def test_checkpoint_export_mistakes_are_one_line_and_lose_nothing(model_dir, data_dir, tmp_path, capsys):
    import shutil

    from safetensors.torch import save_file

    from latentdiff.training.export import main as export_main

    out = tmp_path / "run"
    assert run(model_dir, data_dir, out, steps=1, every=1) == 0
    checkpoint = out / "checkpoint-1"
    base = tmp_path / "base"
    shutil.copytree(model_dir, base)
    before = unet_weights(base)
    capsys.readouterr()

    def export(checkpoint_dir, target) -> str:
        assert export_main(["--model", str(base), "--checkpoint", str(checkpoint_dir), "--out", str(target)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("export: error: ") and "Traceback" not in err
        return err

    assert f"--out {base} is the --model folder: writing it would replace the base model" in export(checkpoint, base)
    (tmp_path / "afile").write_text("mine")
    assert "it is a file, not a folder" in export(checkpoint, tmp_path / "afile")
    assert f"--checkpoint {tmp_path / 'nope'}: no such checkpoint folder" in export(tmp_path / "nope", tmp_path / "m")
    broken = tmp_path / "broken"
    shutil.copytree(checkpoint, broken)
    tensors = load_file(str(broken / "trainable.safetensors"))
    key = next(k for k in tensors if k.endswith("conv_in.weight"))
    tensors[key] = torch.zeros(3)  # copy_ would broadcast this into the whole weight
    save_file(tensors, str(broken / "trainable.safetensors"))
    assert "tensor(s) of another shape, e.g. " + key in export(broken, tmp_path / "m")
    (broken / "trainable.safetensors").unlink()
    assert "trainable.safetensors" in export(broken, tmp_path / "m")
    assert max_diff(unet_weights(base), before) == 0 and (tmp_path / "afile").read_text() == "mine"
    assert not (tmp_path / "m").exists()


def test_lora_export_is_a_plain_model(model_dir, data_dir, tmp_path):
    from latentdiff.pipeline import LatentDiffusionPipeline

    out = tmp_path / "out"
    args = ("--lora-rank", "2", "--train-text-encoder", "--learning-rate", "1e-2")
    assert run(model_dir, data_dir, out, *args, steps=3, every=3) == 0
    base, final = unet_weights(model_dir), unet_weights(out / "final")
    assert final.keys() == base.keys()  # merged: no lora_A / lora_B keys
    changed = {k for k in base if not torch.equal(base[k], final[k])}
    assert changed and all(k.rsplit(".", 2)[-2] in ("to_q", "to_k", "to_v", "0") for k in changed)
    te_base, te_final = (
        {k.removeprefix("text_model."): v for k, v in load_file(str(d / "text_encoder" / "model.safetensors")).items()}
        for d in (model_dir, out / "final")
    )
    assert te_final.keys() == te_base.keys()
    changed = {k for k in te_base if not torch.equal(te_base[k], te_final[k])}
    assert changed and all(k.rsplit(".", 2)[-2] in ("q_proj", "k_proj", "v_proj", "out_proj") for k in changed)
    saved = load_file(str(out / "checkpoint-3" / "trainable.safetensors"))
    assert saved and all("lora_" in k for k in saved)  # checkpoints hold only the adapters
    pipe = LatentDiffusionPipeline.from_pretrained(out / "final")
    assert pipe(["x"], seed=1, steps=2, height=16, width=16, progress=False)[0].size == (16, 16)


def test_cache_latents_run(model_dir, data_dir, tmp_path):
    assert run(model_dir, data_dir, tmp_path / "out", "--cache-latents", steps=2) == 0
    assert run(model_dir, data_dir, tmp_path / "o2", "--cache-latents", "--flip", steps=2) == 1


def test_cache_latents_encodes_each_image_once(model_dir, data_dir):
    from accelerate import Accelerator

    from latentdiff.training.data import CaptionedImages, find_examples
    from latentdiff.training.feed import cache_latents
    from latentdiff.training.models import load_models

    vae = load_models(model_dir, "cpu").vae
    seen = []
    original = vae.encode
    vae.encode = lambda x: seen.append(len(x)) or original(x)
    dataset = CaptionedImages(find_examples(data_dir).examples, 16)
    cached = cache_latents(dataset, vae, Accelerator(cpu=True), 4, lambda *_: None)
    assert sum(seen) == len(dataset) == len(cached.posteriors)
    assert set(cached[(3, 1)]) == {"index", "caption", "mean", "std"}


# ---- checkpoints -----------------------------------------------------------------------------------------
def test_checkpoints_are_atomic_and_pruned(model_dir, data_dir, tmp_path):
    out = tmp_path / "out"
    (out / ".checkpoint-1.tmp").mkdir(parents=True)  # left by a killed run
    (out / "checkpoint-9").mkdir()  # incomplete: no marker
    assert run(model_dir, data_dir, out, "--keep-checkpoints", "2", steps=5, every=1) == 0
    assert [s for s, _ in ckpt.complete_checkpoints(out)] == [4, 5]
    assert not (out / ".checkpoint-1.tmp").exists()
    assert not list(out.glob(".checkpoint-*"))
    assert ckpt.resolve_resume("latest", out) == out / "checkpoint-5"
    assert ckpt.resolve_resume(str(out), out) == out / "checkpoint-5"
    with pytest.raises(ckpt.CheckpointError, match="not a complete checkpoint"):
        ckpt.resolve_resume(str(out / "checkpoint-9"), out)


def test_resume_errors_and_fresh_start(model_dir, data_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert run(model_dir, data_dir, out, "--resume", str(tmp_path / "missing"), steps=1) == 1
    err = capsys.readouterr().err
    assert "no such checkpoint folder" in err and "Traceback" not in err
    assert run(model_dir, data_dir, out, "--resume", "latest", steps=1) == 0
    assert "no checkpoint in" in capsys.readouterr().out  # ... starting fresh
    # that run finished without checkpoints: a second fresh start would overwrite its model
    assert run(model_dir, data_dir, out, "--resume", "latest", steps=1, every=1) == 1
    assert f"already holds the model of a finished run ({out / 'final'}) and no checkpoint" in capsys.readouterr().err
    shutil.rmtree(out / "final")
    assert run(model_dir, data_dir, out, "--resume", "latest", steps=1, every=1) == 0
    assert run(model_dir, data_dir, out, "--lora-rank", "2", "--resume", "latest", steps=2) == 1
    assert "does not match" in capsys.readouterr().err
    checkpoint = out / "checkpoint-1"
    for name in ("optimizer.pt", "trainable.safetensors", "state.json"):
        kept = (checkpoint / name).read_bytes()
        (checkpoint / name).write_bytes(b"garbage")
        assert run(model_dir, data_dir, out, "--resume", "latest", steps=2) == 1
        err = capsys.readouterr().err
        assert f"checkpoint file {checkpoint / name} cannot be read (" in err and "Traceback" not in err
        assert f"delete {checkpoint} and resume from the checkpoint before it" in err
        assert "weights_only" not in err  # torch's advice to unpickle anyway is not passed on
        (checkpoint / name).write_bytes(kept)


def test_nothing_non_finite_is_ever_saved():
    with pytest.raises(ckpt.TrainingError, match="non-finite"):
        ckpt.assert_finite({"w": torch.tensor([1.0, math.nan])}, "checkpoint-1")


def test_ema_update_follows_its_formula():
    from latentdiff.training.ema import EMA

    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    ema = EMA({"net": net}, decay=0.9)
    expected = {k: v.clone() for k, v in ema.shadow.items()}
    g = torch.Generator().manual_seed(0)
    for n in range(4):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn(p.shape, generator=g))
        d = min(0.9, (1 + n) / (10 + n))
        for key, p in ema.params.items():
            expected[key] = d * expected[key] + (1 - d) * p.detach()
        ema.update()
    for key in expected:
        torch.testing.assert_close(ema.shadow[key], expected[key], rtol=1e-6, atol=1e-7)


def test_optimizer_uses_the_fused_kernel_where_there_is_one_and_matches_the_plain_one():
    from latentdiff.training.optim import build_optimizer

    g = torch.Generator().manual_seed(0)
    start = [torch.randn(5, 3, generator=g), torch.randn(7, generator=g)]
    grads = [[torch.randn(p.shape, generator=g) for p in start] for _ in range(4)]
    runs = {}
    for name, make in {
        "ours": lambda ps: build_optimizer([{"params": ps, "lr": 1e-2}]),
        "plain": lambda ps: torch.optim.AdamW(ps, lr=1e-2, foreach=False),
    }.items():
        params = [p.clone().requires_grad_(True) for p in start]
        opt = make(params)
        for step_grads in grads:
            for p, grad in zip(params, step_grads):
                p.grad = grad.clone()
            opt.step()
        runs[name] = (opt, params)
    assert runs["ours"][0].param_groups[0]["fused"]  # this CPU torch has a fused AdamW
    for a, b in zip(runs["ours"][1], runs["plain"][1]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    # where torch has no fused kernel (here: the meta device), the default path, not an error at step 1
    meta = build_optimizer([{"params": [torch.empty(3, device="meta", requires_grad=True)], "lr": 1e-2}])
    assert not meta.param_groups[0]["fused"]


# ---- NaN / inf -------------------------------------------------------------------------------------------
def _nan_at(monkeypatch, bad_calls):
    from latentdiff.training import losses

    real, calls = losses.diffusion_loss, []

    def loss(*args, **kwargs):
        calls.append(1)
        value = real(*args, **kwargs)
        return value * math.nan if len(calls) in bad_calls else value

    monkeypatch.setattr(losses, "diffusion_loss", loss)


def test_a_nan_step_is_skipped_and_counted(model_dir, data_dir, tmp_path, monkeypatch, capsys):
    _nan_at(monkeypatch, {2})
    out = tmp_path / "out"
    assert run(model_dir, data_dir, out, steps=4, every=2) == 0
    captured = capsys.readouterr()
    assert "step 2: non-finite loss" in captured.out and "1 non-finite steps skipped" in captured.out
    state = json.loads((out / "checkpoint-4" / "state.json").read_text())
    assert state["nan_skipped"] == 1 and state["skipped_steps"] == [2]
    for name in ("trainable.safetensors",):
        assert all(torch.isfinite(t).all() for t in load_file(str(out / "checkpoint-2" / name)).values())


def test_nan_steps_in_a_row_stop_the_run(model_dir, data_dir, tmp_path, monkeypatch, capsys):
    _nan_at(monkeypatch, set(range(2, 100)))
    out = tmp_path / "out"
    assert run(model_dir, data_dir, out, "--max-nan-steps", 3, steps=10, every=1) == 1
    err = capsys.readouterr().err
    assert "3 steps in a row had a NaN/inf loss" in err and "Traceback" not in err
    assert not (out / "final").exists()
    for _, path in ckpt.complete_checkpoints(out):
        assert all(torch.isfinite(t).all() for t in load_file(str(path / "trainable.safetensors")).values())


# ---- user errors -----------------------------------------------------------------------------------------
def test_bad_files_give_one_warning_and_the_run_goes_on(model_dir, data_dir, tmp_path, recwarn):
    import shutil

    from latentdiff.training.feed import BadFilesWarning

    data = tmp_path / "data"
    shutil.copytree(data_dir, data)
    (data / "empty.png").write_bytes(b"")
    (data / "text.jpg").write_text("not an image")
    Image.new("RGB", (30, 30)).save(data / "big.png")  # 900 pixels, over the limit below
    assert (
        run(model_dir, data, tmp_path / "out", "--max-image-pixels", "500", "--missing-captions", "empty", steps=1) == 0
    )
    ours = [w for w in recwarn if issubclass(w.category, BadFilesWarning)]
    assert len(ours) == 1
    message = str(ours[0].message)
    assert all(name in message for name in ("empty.png", "text.jpg", "big.png"))
    assert "0.png" not in message
    assert "empty.png" in (tmp_path / "out" / "skipped-files.txt").read_text()


@pytest.mark.parametrize("case", ["missing", "empty", "uncaptioned"])
def test_data_errors_exit_non_zero_without_traceback(model_dir, tmp_path, capsys, case):
    data = tmp_path / "data"
    if case != "missing":
        data.mkdir()
    if case == "uncaptioned":
        Image.new("RGB", (8, 8)).save(data / "a.png")
    assert run(model_dir, data, tmp_path / "out", steps=1) == 1
    err = capsys.readouterr().err
    expected = {"missing": "data folder not found", "empty": "no images found", "uncaptioned": "no caption: a.png"}
    assert expected[case] in err and "Traceback" not in err


def test_bad_resolution_and_model_are_errors(model_dir, data_dir, tmp_path, capsys):
    assert run(model_dir, data_dir, tmp_path / "o", "--resolution", "17", steps=1) == 1
    assert "use a multiple of" in capsys.readouterr().err
    assert run(tmp_path / "nomodel", data_dir, tmp_path / "o", steps=1) == 1
    assert "cannot load --model" in capsys.readouterr().err


def test_bad_shapes_mix_is_a_usage_error(model_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        run(model_dir, "shapes", tmp_path / "o", "--shapes-mix", "relations=3", steps=1)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "--shapes-mix 'relations=3'" in err and "position" in err and "Traceback" not in err
    with pytest.raises(SystemExit):
        run(model_dir, tmp_path / "images", tmp_path / "o", "--shapes-mix", "position=3", steps=1)
    assert "needs --data shapes" in capsys.readouterr().err


def test_bad_timestep_range_is_an_error(model_dir, data_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        run(model_dir, data_dir, tmp_path / "o", "--timestep-range", "900", "700", steps=1)
    assert stop.value.code == 2 and "0 <= LO < HI, got 900 700" in capsys.readouterr().err
    assert run(model_dir, data_dir, tmp_path / "o", "--timestep-range", "700", "1001", steps=1) == 1
    err = capsys.readouterr().err
    assert "use HI <= 1000" in err and "Traceback" not in err


def test_two_loss_weightings_are_a_usage_error(model_dir, data_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        run(model_dir, data_dir, tmp_path / "o", "--v-space-loss", "--snr-gamma", "5", steps=1)
    assert stop.value.code == 2 and "choose one" in capsys.readouterr().err
    assert run(model_dir, data_dir, tmp_path / "o", "--v-space-loss", steps=1) == 0


def test_accelerate_cpu_launch_is_detected(monkeypatch):
    from latentdiff.training.launch import requested_cpu_processes

    launcher = ["python", "accelerate", "launch", "--cpu", "--num_processes", "2", "training/train.py"]
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    assert requested_cpu_processes(launcher) == 2
    assert requested_cpu_processes(["accelerate", "launch", "--cpu", "--num-processes=3", "x.py"]) == 3
    assert requested_cpu_processes(["pytest", "tests"]) == 1
    monkeypatch.setenv("WORLD_SIZE", "2")  # already one of N processes: never launch again
    assert requested_cpu_processes(launcher) == 1
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.delenv("ACCELERATE_USE_CPU")
    assert requested_cpu_processes(launcher) == 1


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--learning-rate", "-1"], "--learning-rate must be a positive number, got -1.0"),
        (["--text-encoder-lr", "0"], "--text-encoder-lr must be a positive number, got 0.0"),
        (["--adam-beta2", "1"], "--adam-beta2 must be in [0, 1), got 1.0"),
        (["--max-grad-norm", "nan"], "--max-grad-norm must be a number >= 0, got nan"),
        (["--noise-offset", "-0.1"], "--noise-offset must be a number >= 0, got -0.1"),
    ],
)
def test_bad_optimizer_numbers_are_usage_errors(model_dir, data_dir, tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as stop:
        run(model_dir, data_dir, tmp_path / "o", *extra, steps=1)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_an_output_dir_that_is_a_file_is_an_error_and_the_file_stays(model_dir, data_dir, tmp_path, capsys):
    (tmp_path / "o").write_text("precious")
    assert run(model_dir, data_dir, tmp_path / "o", steps=1) == 1
    assert f"--output-dir {tmp_path / 'o'} is a file, not a folder" in capsys.readouterr().err
    assert run(model_dir, data_dir, tmp_path / "o" / "sub", steps=1) == 1
    assert f"cannot use --output-dir {tmp_path / 'o' / 'sub'}: Not a directory" in capsys.readouterr().err
    assert (tmp_path / "o").read_text() == "precious"


def test_a_full_disk_is_named_and_the_checkpoints_before_stay(model_dir, data_dir, tmp_path, capsys, monkeypatch):
    """torch.save and safetensors report a short write in their own ways; both become one message."""
    from safetensors import SafetensorError

    out = tmp_path / "o"
    real_save = torch.save

    def torch_save(obj, path, *args, **kwargs):
        if "checkpoint-2" in str(path):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 14433536 vs 14433428")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(ckpt.torch, "save", torch_save)
    assert run(model_dir, data_dir, out, steps=3, every=1) == 1
    err = capsys.readouterr().err
    assert f"error: cannot write checkpoint-2 in {out} (" in err and "Traceback" not in err
    assert "the complete checkpoints before it are kept: make room, then carry on with --resume latest" in err
    assert sorted(p.name for p in out.iterdir() if p.name.startswith((".", "checkpoint"))) == ["checkpoint-1"]

    def no_room(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(ckpt.torch, "save", real_save)
    monkeypatch.setattr("latentdiff.folders.save_file", no_room)
    assert run(model_dir, data_dir, out, "--resume", "latest", steps=3, every=0) == 1
    err = capsys.readouterr().err
    assert f"error: cannot write {out / 'final'} (no space left on its disk); any complete checkpoints" in err
    assert not (out / "final").exists() and "Traceback" not in err

    def bug(*args, **kwargs):
        raise ValueError("a bug")

    monkeypatch.setattr("latentdiff.folders.save_file", bug)
    with pytest.raises(ValueError, match="a bug"):  # anything but a failed write keeps its traceback
        run(model_dir, data_dir, out, "--resume", "latest", steps=3, every=0)


def test_a_full_disk_anywhere_else_is_one_line(model_dir, data_dir, tmp_path, capsys, monkeypatch):
    import errno

    import latentdiff.training.loop

    def no_room(args):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "o" / "losses.csv"))

    monkeypatch.setattr(latentdiff.training.loop, "train", no_room)
    assert run(model_dir, data_dir, tmp_path / "o", steps=1) == 1
    err = capsys.readouterr().err
    assert err == f"error: No space left on device ({tmp_path / 'o' / 'losses.csv'}); make room or fix the folder\n"


def test_training_warnings_are_one_line_for_the_user():
    import warnings

    from latentdiff.cli import one_line_warnings

    plain = warnings.formatwarning
    with one_line_warnings(""):
        shown = warnings.formatwarning("skipped 1 unusable file(s)", UserWarning, "/x/loop.py", 98, "line")
    assert shown == "warning: skipped 1 unusable file(s)\n" and warnings.formatwarning is plain


class _Peer:
    """The main process of two, whose other process reports (through the reduce) that its write failed."""

    is_main_process, process_index, device = True, 0, torch.device("cpu")

    def wait_for_everyone(self):
        pass

    def reduce(self, tensor, reduction):
        assert reduction == "sum"
        return tensor + 1


def test_a_checkpoint_another_process_failed_to_write_is_not_marked_complete(tmp_path):
    with pytest.raises(ckpt.CheckpointError, match="another process failed to write its part"):
        ckpt.write_checkpoint(tmp_path, 5, _Peer(), lambda folder: (folder / "weights").write_text("w"), {"a": 1})
    assert list(tmp_path.iterdir()) == []  # neither checkpoint-5 nor its temporary folder
    assert ckpt.complete_checkpoints(tmp_path) == []


class _Alone(_Peer):
    """The only process: its write is the only one."""

    def reduce(self, tensor, reduction):
        return tensor


def test_a_stop_while_rewriting_a_checkpoint_keeps_the_earlier_one(tmp_path, monkeypatch):
    """Writing checkpoint-N again moves the old one aside first; stopped between the two renames, the next start
    puts it back, and a checkpoint never appears without its marker."""
    write = lambda text: lambda folder: (folder / "weights").write_text(text)  # noqa: E731
    ckpt.write_checkpoint(tmp_path, 5, _Alone(), write("old"), {"a": 1})
    replaced = []

    def stop_after_moving_aside(source, target):
        os.rename(source, target)
        replaced.append(target)
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt.os, "replace", stop_after_moving_aside)
    with pytest.raises(KeyboardInterrupt):
        ckpt.write_checkpoint(tmp_path, 5, _Alone(), write("new"), {"a": 1})
    monkeypatch.undo()
    assert [p.name for p in replaced] == [".checkpoint-5.old"] and ckpt.complete_checkpoints(tmp_path) == []
    ckpt.remove_stale_temporaries(tmp_path)
    assert ckpt.complete_checkpoints(tmp_path) == [(5, tmp_path / "checkpoint-5")]
    assert (tmp_path / "checkpoint-5" / "weights").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-5"]

    ckpt.write_checkpoint(tmp_path, 5, _Alone(), write("new"), {"a": 1})  # uninterrupted: the new one, whole
    assert (tmp_path / "checkpoint-5" / "weights").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-5"]


def test_a_marker_that_cannot_be_written_is_a_checkpoint_error_every_process_learns_of(tmp_path, monkeypatch):
    """The COMPLETE marker is written where a failure reaches every process (the reduce): on a full disk the
    others must not wait forever at the last barrier while the main process dies on its own."""
    import errno
    import pathlib

    real = pathlib.Path.write_text

    def full_disk(self, *args, **kwargs):
        if self.name == ckpt.MARKER:
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "write_text", full_disk)
    with pytest.raises(ckpt.CheckpointError, match="cannot write checkpoint-5 .*No space left on device"):
        ckpt.write_checkpoint(tmp_path, 5, _Alone(), lambda folder: real(folder / "weights", "w"), {"a": 1})
    assert list(tmp_path.iterdir()) == []


def test_a_fresh_start_never_overwrites_an_earlier_run(model_dir, data_dir, tmp_path, capsys):
    out = tmp_path / "o"
    assert run(model_dir, data_dir, out, steps=2, every=2) == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.suffix == ".safetensors"}
    assert run(model_dir, data_dir, out, "--keep-checkpoints", "1", steps=2, every=1) == 1
    err = capsys.readouterr().err
    assert f"--output-dir {out} already holds a run (checkpoint-2, 1 checkpoint(s) in all)" in err
    assert "continue it with --resume latest, or choose another --output-dir" in err and "Traceback" not in err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.suffix == ".safetensors"} == before


def test_resuming_with_another_lora_rank_names_the_shapes(model_dir, data_dir, tmp_path, capsys):
    out = tmp_path / "o"
    assert run(model_dir, data_dir, out, "--lora-rank", "2", steps=1, every=1) == 0
    assert run(model_dir, data_dir, out, "--lora-rank", "4", "--resume", "latest", steps=2) == 1
    err = capsys.readouterr().err
    assert "does not match this run's trained parameters (was it made with other --lora-rank" in err
    assert "tensor(s) of another shape, e.g. unet." in err and "Traceback" not in err


@pytest.mark.parametrize(("stop", "status"), [("ctrl-c", 130), ("sigterm", 143)])
def test_a_stop_is_one_line_naming_the_checkpoint_kept(
    model_dir, data_dir, tmp_path, capsys, monkeypatch, stop, status
):
    """Ctrl-C, or SIGTERM (kill, a job scheduler, accelerate's launcher on Ctrl-C): no traceback, resumable."""
    real = ckpt.write_checkpoint

    def write_then_stop(out_dir, step, *args):
        path = real(out_dir, step, *args)
        if step == 2 and stop == "ctrl-c":
            raise KeyboardInterrupt
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return path

    monkeypatch.setattr(ckpt, "write_checkpoint", write_then_stop)
    out = tmp_path / "o"
    assert run(model_dir, data_dir, out, steps=4, every=1) == status
    err = capsys.readouterr().err
    assert f"interrupted; {out / 'checkpoint-2'} is the newest complete checkpoint: carry on with --resume" in err
    assert "Traceback" not in err
    monkeypatch.setattr(ckpt, "write_checkpoint", real)
    assert run(model_dir, data_dir, out, "--resume", "latest", steps=4, every=1) == 0


def test_sigterm_to_the_process_group_with_dataloader_workers_is_the_same_one_line(
    model_dir, data_dir, tmp_path, capsys, monkeypatch
):
    """`timeout`, a job scheduler or accelerate's launcher signal every process: a DataLoader worker dies of
    the SIGTERM too, often only after this process has met its own, which torch's SIGCHLD handler must not
    turn into a traceback."""
    import multiprocessing
    import subprocess
    import time

    real_write, real_find = ckpt.write_checkpoint, ckpt.complete_checkpoints
    workers = []

    def write_then_sigterm(out_dir, step, *args):
        path = real_write(out_dir, step, *args)
        if step == 2:
            workers.extend(multiprocessing.active_children())
            assert len(workers) == 1
            os.kill(os.getpid(), signal.SIGTERM)
        return path

    def worker_dies_then_find(out_dir):  # after the SIGTERM: called while the stop is reported
        for worker in workers:  # killed from another process: torch's exits quietly on a SIGTERM from its parent
            subprocess.run(["kill", "-TERM", str(worker.pid)], check=True)
            while os.waitid(os.P_PID, worker.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
                time.sleep(0.01)
        return real_find(out_dir)

    monkeypatch.setattr(ckpt, "write_checkpoint", write_then_sigterm)
    monkeypatch.setattr(ckpt, "complete_checkpoints", worker_dies_then_find)
    out = tmp_path / "o"
    assert run(model_dir, data_dir, out, "--num-workers", "1", steps=4, every=1) == 143
    err = capsys.readouterr().err
    assert f"interrupted; {out / 'checkpoint-2'} is the newest complete checkpoint" in err
    assert "Traceback" not in err and "DataLoader worker" not in err
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_options_that_do_nothing_alone_are_refused(model_dir, data_dir, tmp_path, capsys):
    for extra, message in [
        (["--validation-prompts", "a cat"], "--validation-prompts does nothing without --validate-every"),
        (["--text-encoder-lr", "1e-3"], "--text-encoder-lr does nothing without --train-text-encoder"),
        (["--lora-alpha", "8"], "--lora-alpha does nothing without --lora-rank"),
        (["--keep-checkpoints", "2"], "--keep-checkpoints does nothing without --checkpoint-every"),
    ]:
        with pytest.raises(SystemExit):
            run(model_dir, data_dir, tmp_path / "o", *extra, steps=1)
        assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_resuming_a_finished_run_says_there_is_nothing_to_train(model_dir, data_dir, tmp_path, capsys):
    out = tmp_path / "o"
    assert run(model_dir, data_dir, out, steps=2, every=5) == 0  # the last step is checkpointed too
    assert [step for step, _ in ckpt.complete_checkpoints(out)] == [2]
    capsys.readouterr()
    assert run(model_dir, data_dir, out, "--resume", "latest", steps=1) == 0
    printed = capsys.readouterr().out
    assert "the checkpoint is at step 2, not below --max-steps 1: nothing to train; writing its model" in printed
    assert "done: 2 steps, no steps this run, 0 non-finite steps skipped" in printed and "nan" not in printed


def test_a_run_that_fails_at_once_leaves_no_empty_output_folder(data_dir, tmp_path, capsys):
    (tmp_path / "not-a-model").mkdir()
    assert run(tmp_path / "not-a-model", data_dir, tmp_path / "o", steps=1) == 1
    assert "model_index.json" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    (tmp_path / "kept").mkdir()  # a folder that was there before is the user's: it stays
    assert run(tmp_path / "not-a-model", data_dir, tmp_path / "kept", steps=1) == 1
    assert (tmp_path / "kept").is_dir()


def test_help_explains_every_option_and_shows_only_real_defaults(monkeypatch):
    """`train.py --help` and `train_vae.py --help`: one line per option (wide terminal), each with a text, none
    with "(default: None)" or a second default after the one its text names."""
    import argparse

    from latentdiff.training.cli import build_parser
    from latentdiff.training.vae_train import build_parser as build_vae_parser

    monkeypatch.setenv("COLUMNS", "400")
    for parser in (build_parser(), build_vae_parser()):
        text = parser.format_help()
        options = [a for a in parser._actions if not isinstance(a, argparse._HelpAction)]
        assert all(a.help for a in options), [a.option_strings for a in options if not a.help]
        for line in text.splitlines():
            assert line.count("default") <= 1, line
        for shown in ("(default: None)", "(default: False)", "(default: [])"):
            assert shown not in text
        assert "(default: 0)" in text  # a zero is a real default, shown


def test_the_last_line_counts_steps_in_english():
    from latentdiff.training.progress import done_text

    assert done_text({"steps": 1, "steps_this_run": 1, "images_per_s": 2.0}) == "done: 1 step, 2.00 images/s this run"
    assert done_text({"steps": 3, "steps_this_run": 0}) == "done: 3 steps, no steps this run"
