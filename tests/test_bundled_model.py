"""The bundled default model: small, loads without a path, and diffusers reads it to the same images."""

import numpy as np
import pytest
import torch

from latentdiff.pipeline import BUNDLED_MODEL

pytestmark = pytest.mark.skipif(
    not (BUNDLED_MODEL / "model_index.json").is_file(), reason=f"no bundled model at {BUNDLED_MODEL} yet"
)


def test_weights_fit_in_30_mb_of_fp16_safetensors():
    files = list(BUNDLED_MODEL.rglob("*.safetensors"))
    assert {f.parent.name for f in files} == {"unet", "vae", "text_encoder"}
    assert sum(f.stat().st_size for f in files) <= 30 * 1024 * 1024
    assert not [p for p in BUNDLED_MODEL.rglob("*") if p.suffix in (".bin", ".ckpt", ".pt", ".pth")]


def test_loads_by_default_with_stored_defaults():
    from latentdiff import LatentDiffusionPipeline

    pipe = LatentDiffusionPipeline.from_pretrained()
    assert pipe.source == BUNDLED_MODEL
    assert set(pipe.defaults) >= {"steps", "guidance_scale", "sampler", "height", "width"}
    (image,) = pipe("a red circle", seed=0, progress=False)
    assert image.size == (pipe.defaults["width"], pipe.defaults["height"])


def test_diffusers_gives_the_same_images_with_the_stored_defaults():
    import diffusers

    from latentdiff import LatentDiffusionPipeline
    from latentdiff.folders import DIFFUSERS_SCHEDULERS

    pipe = LatentDiffusionPipeline.from_pretrained()
    d = pipe.defaults
    prompts = ["a red circle to the left of a blue square", "three yellow stars on a black background"]
    ours = pipe(prompts, seed=[3, 4], progress=False)
    theirs = diffusers.StableDiffusionPipeline.from_pretrained(
        str(BUNDLED_MODEL), torch_dtype=torch.float32, safety_checker=None
    )
    assert type(theirs.scheduler).__name__ == DIFFUSERS_SCHEDULERS[d["sampler"]]
    theirs.set_progress_bar_config(disable=True)
    images = theirs(
        prompts,
        height=d["height"],
        width=d["width"],
        num_inference_steps=d["steps"],
        guidance_scale=d["guidance_scale"],
        generator=[torch.Generator().manual_seed(s) for s in (3, 4)],
    ).images
    diff = max(np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max() for a, b in zip(ours, images))
    assert diff <= 3, f"max pixel difference {diff}/255"


@pytest.mark.slow
def test_reproduce_makes_batch_images_again_bit_for_bit(tmp_path, capsys):
    """At the bundled model's size some images of a batch come out 1/255 apart when made alone (oneDNN
    picks its convolution algorithm by batch size); `reproduce` repeats the batch and matches them all."""
    from latentdiff.cli import main

    colours, shapes = ["red", "blue", "green", "yellow", "cyan", "magenta", "white", "orange"], ["circle", "star"]
    lines = [f"a {colours[i % 8]} {shapes[i % 2]} above a {colours[(3 * i + 1) % 8]} square" for i in range(16)]
    (tmp_path / "prompts.txt").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    assert main(["generate", str(tmp_path / "prompts.txt"), "--batch-size", "16", "--out", str(out), "--quiet"]) == 0
    files = sorted(out.glob("*.png"))
    assert len(files) == 16
    apart = [f for f in files if main(["reproduce", "--alone", str(f)]) == 1]
    if not apart:
        pytest.skip("on this CPU every image of the batch came out the same alone: nothing to tell apart")
    capsys.readouterr()
    assert [main(["reproduce", str(f)]) for f in apart] == [0] * len(apart)
    assert capsys.readouterr().out.count("reproduced pixel for pixel") == len(apart)
