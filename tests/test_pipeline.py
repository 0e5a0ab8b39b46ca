"""LatentDiffusionPipeline against diffusers' StableDiffusionPipeline on the same tiny random weights."""

import copy
import json
import os
import re
import signal
import threading
import warnings

import numpy as np
import pytest
import torch

from latentdiff import LatentDiffusionPipeline
from latentdiff.testing.tiny import save_tiny_pipeline

SIZE = 32  # tiny VAE (factor 2) and tiny U-Nets (2 or 3 levels) all take 32x32
DIFFUSERS = {
    "ddim": "DDIMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "heun": "HeunDiscreteScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",
    "ddpm": "DDPMScheduler",
}


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("sd1") / "model", "sd1", seed=0)


@pytest.fixture(scope="module")
def sd2(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("sd2") / "model", "sd2", seed=1)


def pixels(images):
    return np.stack([np.asarray(im, dtype=np.int16) for im in images])


def diffusers_images(folder, prompts, seeds, sampler, karras=False, **kwargs):
    """Images of diffusers' StableDiffusionPipeline from `folder`, with the scheduler of `sampler`."""
    import diffusers

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None)
    options = {"use_karras_sigmas": True} if karras else {}
    pipe.scheduler = getattr(diffusers, DIFFUSERS[sampler]).from_config(pipe.scheduler.config, **options)
    return run_diffusers(pipe, prompts, seeds, **kwargs)


def run_diffusers(pipe, prompts, seeds, **kwargs):
    """`pipe`'s SIZE x SIZE images, image i from a generator seeded with seeds[i]."""
    pipe.set_progress_bar_config(disable=True)
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    return pipe(prompts, generator=generators, output_type="pil", height=SIZE, width=SIZE, **kwargs).images


@pytest.mark.parametrize(
    "style,sampler,karras",
    [
        ("sd1", "dpmpp_2m", False),
        ("sd1", "ddim", False),
        ("sd1", "euler", True),
        ("sd1", "euler_a", False),
        ("sd1", "heun", False),
        ("sd2", "dpmpp_2m", True),
        ("sd2", "euler", False),
        ("sd2", "ddpm", False),
    ],
    ids=lambda v: str(v),
)
def test_images_match_diffusers(style, sampler, karras, request):
    folder = request.getfixturevalue(style)
    prompts = ["a red circle", "two blue squares on a gray background"]
    pipe = LatentDiffusionPipeline.from_pretrained(folder)
    ours = pipe(
        prompts,
        negative_prompt="blurry",
        height=SIZE,
        width=SIZE,
        steps=4,
        guidance_scale=5.0,
        sampler=sampler,
        karras=karras,
        seed=[11, 12],
        progress=False,
    )
    theirs = diffusers_images(
        folder,
        prompts,
        [11, 12],
        sampler,
        karras,
        negative_prompt=["blurry"] * 2,
        num_inference_steps=4,
        guidance_scale=5.0,
    )
    diff = np.abs(pixels(ours) - pixels(theirs)).max()
    assert diff <= 3, f"max pixel difference {diff}/255"


def test_no_guidance_matches_diffusers_and_runs_conditional_half_only(sd1):
    pipe = LatentDiffusionPipeline.from_pretrained(sd1)
    batch_sizes = []
    hook = pipe.unet.register_forward_hook(lambda m, args, out: batch_sizes.append(args[0].shape[0]))
    call = dict(height=SIZE, width=SIZE, steps=3, guidance_scale=1.0, seed=5, sampler="dpmpp_2m", progress=False)
    ours = pipe("a red circle", **call)
    hook.remove()
    assert set(batch_sizes) == {1}
    theirs = diffusers_images(sd1, ["a red circle"], [5], "dpmpp_2m", num_inference_steps=3, guidance_scale=1.0)
    assert np.abs(pixels(ours) - pixels(theirs)).max() <= 3


def test_image_in_batch_equals_image_alone_and_is_repeatable(sd1):
    pipe = LatentDiffusionPipeline.from_pretrained(sd1)
    common = dict(height=SIZE, width=SIZE, steps=3, sampler="euler_a", progress=False)
    batch = pipe(["a red circle", "a blue star"], seed=100, num_images_per_prompt=2, **common)
    assert [im.info["parameters"].splitlines()[0] for im in batch] == ["a red circle"] * 2 + ["a blue star"] * 2
    alone = pipe("a blue star", seed=103, **common)  # image k = 3 of the batch used seed 100 + 3
    assert np.array_equal(pixels(batch[3:]), pixels(alone))
    again = pipe(["a red circle", "a blue star"], seed=100, num_images_per_prompt=2, **common)
    assert np.array_equal(pixels(batch), pixels(again))
    assert not np.array_equal(pixels(batch[:1]), pixels(batch[1:2]))  # different seeds, different images


def test_calls_from_several_threads_take_turns_and_make_the_same_images(sd1):
    """A web server calls one pipeline from its worker threads: a call's caches live on the shared modules, so a
    second call waits for the first (two at once tore them: a TypeError mid-call)."""
    pipe = LatentDiffusionPipeline.from_pretrained(sd1)
    common = dict(height=SIZE, width=SIZE, steps=3, progress=False)
    alone = pixels(pipe(["a red circle", "a blue star"], seed=0, **common))
    a_waits, a_goes_on, b_stepped, found = threading.Event(), threading.Event(), threading.Event(), {}

    def hold(i, t, x):  # the first call stops at its first step until told to go on
        a_waits.set()
        assert a_goes_on.wait(30)

    def run(name, prompt, seed, callback):
        found[name] = pixels(pipe(prompt, seed=seed, callback=callback, **common))

    a = threading.Thread(target=run, args=("a", "a red circle", 0, hold))
    b = threading.Thread(target=run, args=("b", "a blue star", 1, lambda i, t, x: b_stepped.set()))
    a.start()
    assert a_waits.wait(30)
    b.start()
    assert not b_stepped.wait(1.0)  # the second call has not begun while the first is mid-call
    a_goes_on.set()
    a.join(30)
    b.join(30)
    assert np.array_equal(np.concatenate([found["a"], found["b"]]), alone)
    twin = copy.deepcopy(pipe)  # a copy has a lock of its own
    assert twin._turn is not pipe._turn and np.array_equal(pixels(twin("a blue star", seed=1, **common)), alone[1:])


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork() only")
def test_a_process_forked_while_another_thread_is_mid_call_can_call_the_pipeline(sd1):
    """The parent's thread mid-call holds the pipeline's lock; the forked child has no such thread to release it,
    so it gets a lock of its own (its first call waited forever)."""
    pipe = LatentDiffusionPipeline.from_pretrained(sd1)
    held, go_on = threading.Event(), threading.Event()

    def hold(i, t, x):
        held.set()
        assert go_on.wait(30)

    caller = threading.Thread(target=lambda: pipe("a red circle", height=SIZE, width=SIZE, steps=2, callback=hold))
    caller.start()
    try:
        assert held.wait(30)
        pid = os.fork()
        if pid == 0:  # the child: one thread (see workers.start_child), killed by the alarm if it waits
            code = 1
            try:
                signal.alarm(20)
                torch.set_num_threads(1)
                pipe.encode("a blue star")
                code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
    finally:
        go_on.set()
        caller.join(30)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, f"the child did not finish: status {status}"


def test_parameters_text_in_a1111_format(sd1):
    pipe = LatentDiffusionPipeline.from_pretrained(sd1)
    (image,) = pipe(
        "a red circle",
        negative_prompt="ugly",
        height=SIZE,
        width=SIZE,
        steps=2,
        seed=1234,
        guidance_scale=7.5,
        sampler="dpmpp_2m",
        progress=False,
    )
    lines = image.info["parameters"].splitlines()
    assert lines[0] == "a red circle"
    assert lines[1] == "Negative prompt: ugly"
    assert lines[2].startswith(f"Steps: 2, Sampler: dpmpp_2m, CFG scale: 7.5, Seed: 1234, Size: {SIZE}x{SIZE}, Model: ")
    record = json.loads(image.info["latentdiff"])
    assert record["seed"] == 1234 and record["model_hash"]


def test_no_image_claims_the_folder_once_the_weights_changed_in_memory(sd1):
    """The model hash names the folder; after an in-place write (a LoRA merge, an optimizer step) or a swapped
    module, that folder no longer makes these images, so the record must not point at it."""
    from latentdiff.folders import folder_hash

    pipe = LatentDiffusionPipeline.from_pretrained(sd1)
    call = dict(prompt="a cat", height=SIZE, width=SIZE, steps=2, seed=0, progress=False)
    record = lambda: json.loads(pipe(**call)[0].info["latentdiff"])  # noqa: E731
    assert record()["model_hash"] == folder_hash(sd1)
    pipe.to(dtype=torch.bfloat16)  # as loading the folder in bf16 gives: still the folder's (the record says bf16)
    assert record()["model_hash"] == folder_hash(sd1)
    pipe.to(dtype=torch.float32)  # but bf16's rounding stays: loading in fp32 would not give these weights
    assert record()["model_hash"] is None
    pipe = LatentDiffusionPipeline.from_pretrained(sd1)
    with torch.no_grad():
        next(pipe.unet.parameters()).add_(0.01)
    assert record()["model_hash"] is None
    pipe = LatentDiffusionPipeline.from_pretrained(sd1)
    pipe.text_encoder = LatentDiffusionPipeline.from_pretrained(sd1).text_encoder  # equal weights, but not known
    assert pipe.model_hash is None


def test_a_pipeline_loaded_in_inference_mode_works_and_keeps_its_hash(sd1):
    """Tensors made under inference_mode have no version counter for the weights check to read."""
    from latentdiff.folders import folder_hash

    with torch.inference_mode():
        pipe = LatentDiffusionPipeline.from_pretrained(sd1)
        (image,) = pipe("a cat", height=SIZE, width=SIZE, steps=2, seed=0, progress=False)
        pipe.to(dtype=torch.bfloat16)
    assert json.loads(image.info["latentdiff"])["model_hash"] == folder_hash(sd1) == pipe.model_hash


@pytest.mark.parametrize(
    ("scheduler", "karras", "sampler"),
    [("EulerDiscreteScheduler", True, "euler"), ("DDIMScheduler", False, "ddim"), ("PNDMScheduler", False, "dpmpp_2m")],
)
def test_a_diffusers_folder_samples_with_its_own_scheduler_by_default(sd1, tmp_path, scheduler, karras, sampler):
    """As diffusers' pipeline does: the folder's scheduler class (and Karras flag), unless the call names another;
    a class latentdiff has no twin for (SD 1.5's PNDM) leaves latentdiff's own default."""
    import shutil

    folder = shutil.copytree(sd1, tmp_path / "m")
    config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    config |= {"_class_name": scheduler, "use_karras_sigmas": karras}
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    pipe = LatentDiffusionPipeline.from_pretrained(folder)
    assert (pipe.defaults["sampler"], bool(pipe.defaults.get("karras"))) == (sampler, karras)
    if scheduler == "EulerDiscreteScheduler":  # the same image as diffusers' default call on this folder
        ours = pipe("a red circle", height=SIZE, width=SIZE, steps=3, seed=5, progress=False)
        theirs = diffusers_images(folder, ["a red circle"], [5], "euler", karras=True, num_inference_steps=3)
        assert np.abs(pixels(ours) - pixels(theirs)).max() <= 1


def test_the_other_public_methods_take_what_users_pass(sd1):
    pipe = LatentDiffusionPipeline.from_pretrained(sd1)
    assert pipe.encode("abc").shape[0] == 1  # one prompt, not one per character
    with pytest.raises(ValueError, match="prompts list is empty"):
        pipe.encode([])
    latent = (pipe.unet.config.in_channels, SIZE // pipe.vae_scale_factor, SIZE // pipe.vae_scale_factor)
    (image,) = pipe.decode_latents(torch.randn(1, *latent))  # outside no_grad, as a user would call it
    assert image.size == (SIZE, SIZE)
    assert pipe.to(torch.bfloat16).dtype == torch.bfloat16  # positional dtype, as diffusers takes it
    pipe.to(torch.float32)
    (a,) = pipe("a cat", height=SIZE, width=SIZE, steps=2, seed=0, progress=False, workers=np.int64(1))
    assert a.size == (SIZE, SIZE)


def test_a_pipeline_built_from_parts_that_do_not_fit_is_refused(sd1):
    from latentdiff.clip import CLIPTextEncoder, CLIPTextSettings

    one = LatentDiffusionPipeline.from_pretrained(sd1)
    parts = (one.unet, one.vae, one.text_encoder, one.tokenizer, one.scheduler_config)
    raw = {**one.text_encoder.config_dict(), "hidden_size": 48, "intermediate_size": 96}
    wide = CLIPTextEncoder(CLIPTextSettings.from_dict(raw, "test"), raw)  # 48 wide; the U-Net attends to 32
    with pytest.raises(ValueError, match="the U-Net attends to a context 32 wide, but the text encoder makes 48"):
        LatentDiffusionPipeline(one.unet, one.vae, wide, one.tokenizer, one.scheduler_config)
    with pytest.raises(ValueError, match="defaults: unknown setting 'foo'"):
        LatentDiffusionPipeline(*parts, defaults={"foo": 1})
    with pytest.raises(ValueError, match="defaults: karras = 'yes' is not true or false"):
        LatentDiffusionPipeline(*parts, defaults={"karras": "yes"})
    with pytest.raises(TypeError, match="defaults must be a dict of sampling settings or None"):
        LatentDiffusionPipeline(*parts, defaults="notadict")


def test_random_seed_is_recorded_and_reproduces(sd1):
    pipe = LatentDiffusionPipeline.from_pretrained(sd1)
    (image,) = pipe("a cat", height=SIZE, width=SIZE, steps=2, progress=False)
    seed = json.loads(image.info["latentdiff"])["seed"]
    (again,) = pipe("a cat", height=SIZE, width=SIZE, steps=2, seed=seed, progress=False)
    assert np.array_equal(pixels([image]), pixels([again]))


@pytest.mark.parametrize("dtype", [None, torch.float16])
def test_save_load_round_trip_and_diffusers_reads_our_folder(sd2, tmp_path, dtype):
    pipe = LatentDiffusionPipeline.from_pretrained(sd2)
    if dtype is not None:  # fp16 files: compare against the same weights rounded to fp16
        pipe = LatentDiffusionPipeline.from_pretrained(pipe.save_pretrained(tmp_path / "half", dtype=dtype))
    common = dict(height=SIZE, width=SIZE, steps=3, guidance_scale=4.0, sampler="euler", seed=[7], progress=False)
    before = pipe("a green triangle", **common)
    saved = pipe.save_pretrained(tmp_path / "saved", dtype=dtype)
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):  # what old and new transformers read
        assert (saved / "tokenizer" / name).is_file()
    after = LatentDiffusionPipeline.from_pretrained(saved)("a green triangle", **common)
    assert np.array_equal(pixels(before), pixels(after))
    theirs = diffusers_images(saved, ["a green triangle"], [7], "euler", num_inference_steps=3, guidance_scale=4.0)
    assert np.abs(pixels(before) - pixels(theirs)).max() <= 3


def test_reads_diffusers_fp16_variant_folder(tmp_path):
    from latentdiff.testing.tiny import tiny_diffusers_pipeline

    dpipe = tiny_diffusers_pipeline("sd1", seed=3)
    dpipe.to(torch.float16).save_pretrained(str(tmp_path / "m"), variant="fp16", safe_serialization=True)
    assert (tmp_path / "m" / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    pipe = LatentDiffusionPipeline.from_pretrained(tmp_path / "m")
    assert pipe.dtype == torch.float32
    ours = pipe("a pink star", height=SIZE, width=SIZE, steps=3, seed=[3], sampler="ddim", progress=False)
    dpipe.to(torch.float32)
    import diffusers

    dpipe.scheduler = diffusers.DDIMScheduler.from_config(dpipe.scheduler.config)
    theirs = run_diffusers(dpipe, "a pink star", [3], num_inference_steps=3)
    assert np.abs(pixels(ours) - pixels(theirs)).max() <= 3


def test_long_prompt_truncated_with_warning_naming_dropped_words(sd1):
    pipe = LatentDiffusionPipeline.from_pretrained(sd1)
    prompt = "x" * 80 + " zebra"  # byte-level tokenizer: one token per character, window of 77
    with pytest.warns(UserWarning, match="zebra") as caught:
        pipe(prompt, height=SIZE, width=SIZE, steps=1, seed=0, progress=False)
    assert caught[0].filename == __file__  # the user's line, not torch's no_grad wrapper or ours
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pipe("short", height=SIZE, width=SIZE, steps=1, seed=0, progress=False)


def test_clip_skip_changes_context(sd1):
    pipe = LatentDiffusionPipeline.from_pretrained(sd1)
    a = pipe.encode(["a red circle"])
    b = pipe.encode(["a red circle"], clip_skip=1)
    assert a.shape == b.shape and not torch.allclose(a, b)
    with pytest.raises(ValueError, match="clip_skip"):
        pipe.encode(["a"], clip_skip=5)


def test_encode_more_prompts_than_the_cache_holds(sd1, monkeypatch):
    import latentdiff.pipeline as pipeline

    monkeypatch.setattr(pipeline, "CONTEXT_CACHE_SIZE", 4)
    pipe = LatentDiffusionPipeline.from_pretrained(sd1)
    old = pipe.encode(["p0", "p1"])
    # six distinct prompts in one call, two of them cached (and oldest) before it: none may be lost mid-call
    many = pipe.encode(["p1", "q0", "q1", "q2", "q3", "p0"])
    torch.testing.assert_close(many[[5, 0]], old, rtol=0, atol=0)
    torch.testing.assert_close(many[1], pipe.encode(["q0"])[0], rtol=0, atol=0)
    assert len(pipe._context_cache) <= 4


def test_cached_contexts_follow_the_text_encoder(sd1):
    """A prompt encoded before must be encoded again once the text encoder (or tokenizer) is another."""
    from latentdiff.training.lora import TEXT_ENCODER_TARGETS, add_lora

    pipe = LatentDiffusionPipeline.from_pretrained(sd1)
    fresh = lambda: LatentDiffusionPipeline.from_pretrained(sd1)  # noqa: E731 - no cache, same weights
    before = pipe.encode(["a red circle"])
    with torch.no_grad():  # weights changed in place
        for p in pipe.text_encoder.parameters():
            p.mul_(1.5)
    changed = pipe.encode(["a red circle"])
    assert not torch.equal(changed, before)
    reference = fresh()
    with torch.no_grad():
        for p in reference.text_encoder.parameters():
            p.mul_(1.5)
    torch.testing.assert_close(changed, reference.encode(["a red circle"]), rtol=0, atol=0)

    pipe.text_encoder = fresh().text_encoder  # a module swapped in
    torch.testing.assert_close(pipe.encode(["a red circle"]), before, rtol=0, atol=0)
    add_lora(pipe.text_encoder, 2, None, TEXT_ENCODER_TARGETS)  # wrapped: its zero-initialised B keeps the output
    with torch.no_grad():
        for name, p in pipe.text_encoder.named_parameters():
            if "lora_B" in name:
                p.fill_(0.1)
    assert not torch.equal(pipe.encode(["a red circle"]), before)


# ---- bad input: one clear error --------------------------------------------------------------------


@pytest.fixture(scope="module")
def pipe1(sd1):
    return LatentDiffusionPipeline.from_pretrained(sd1)


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        (
            dict(sampler="plms"),
            ValueError,
            r"unknown sampler 'plms'; choose from \['ddim', 'ddpm', 'dpmpp_2m'",
        ),
        (dict(height=31), ValueError, "multiples of 2"),
        (dict(width=0), ValueError, "multiples of 2"),
        (dict(steps=0), ValueError, "steps must be a positive integer"),
        (dict(steps=-3), ValueError, "steps must be a positive integer"),
        (dict(prompt=[]), ValueError, "prompt list is empty"),
        (dict(negative_prompt=["a", "b"]), ValueError, "negative prompts for 1 prompts"),
        (dict(seed=[1, 2]), ValueError, "2 seeds for 1 images"),
        (dict(prompt=None), TypeError, "prompt must be a str or a list of str, got NoneType"),
        (dict(negative_prompt=5), TypeError, "negative_prompt must be a str or a list of str, got int"),
        (dict(height=float(SIZE)), TypeError, "height must be a whole number of pixels"),
        (dict(guidance_scale=float("nan")), ValueError, "guidance_scale must be a finite number, got nan"),
        (dict(guidance_scale=-float("inf")), ValueError, "guidance_scale must be a finite number, got -inf"),
        (dict(eta=-0.5), ValueError, r"eta must be a finite number >= 0, got -0.5"),
        (dict(karras="yes"), TypeError, "karras must be True, False or None"),
        (dict(seed=1.5), TypeError, "seed must be an int or a list of ints, got 1.5"),
        (dict(seed=-1), ValueError, "seeds must be between 0 and 18446744073709551615 .* image 1 would get -1"),
        (dict(seed=2**64 - 1, num_images_per_prompt=2), ValueError, "image 2 would get 18446744073709551616"),
        # the schedule's top step counts: t = 1000 (out of the tables), two equal noise levels (NaN latents)
        (dict(sampler="ddim", steps=1000), ValueError, r"steps=1000 is too many .*past the last .*use at most 999"),
        (dict(sampler="dpmpp_2m", steps=999), ValueError, r"two steps would share a noise level\); use at most 998"),
        (dict(clip_skip=1.0), TypeError, "clip_skip must be None or a whole number of layers, got 1.0"),
        (dict(num_images_per_prompt=True), ValueError, "num_images_per_prompt must be a positive integer"),
        (dict(callback=5), TypeError, "callback must be callable"),
    ],
)
def test_bad_call_arguments(pipe1, kwargs, error, message):
    call = dict(prompt="a red circle", height=SIZE, width=SIZE, steps=2, seed=0, progress=False)
    call.update(kwargs)
    with pytest.raises(error, match=message):
        pipe1(**call)


def test_numpy_numbers_work_as_python_ones(pipe1):
    call = dict(prompt="a red circle", sampler="ddim", seed=0, progress=False, workers=1)
    plain = pipe1(**call, height=SIZE, width=SIZE, steps=2, guidance_scale=2.5, eta=0.5, clip_skip=1)[0]
    numpy = pipe1(
        **call,
        height=np.int64(SIZE),
        width=np.int32(SIZE),
        steps=np.int64(2),
        guidance_scale=np.float32(2.5),
        eta=np.float64(0.5),
        clip_skip=np.int64(1),
        num_images_per_prompt=np.int64(1),
    )[0]
    assert np.array_equal(pixels([plain]), pixels([numpy]))
    assert numpy.info["latentdiff"] == plain.info["latentdiff"]  # the same JSON record, written


def unusable_cuda_message() -> str:
    """What moving to cuda:99 must say on this torch build: no CUDA at all, or too few GPUs."""
    if torch.version.cuda is None and torch.version.hip is None:
        return "was built without CUDA, so cuda:99 cannot be used; use cpu"
    return "no cuda device is available" if not torch.cuda.is_available() else "cuda:99 does not exist"


@pytest.mark.parametrize(
    "device, message",
    [
        ("cuda:99", None),
        ("banana", "'banana' is not a torch device"),
        ("cuda:-1", "is not a torch device"),
        ("meta", "the meta device holds no data, so nothing can run on it; use cpu"),
    ],
)
def test_an_unusable_device_is_named_and_the_pipeline_stays_put(pipe1, device, message):
    with pytest.raises(ValueError, match=re.escape(message or unusable_cuda_message())):
        pipe1.to(device)
    assert {p.device.type for p in pipe1.unet.parameters()} == {"cpu"}
    assert pipe1.to("cpu:0").device.type == "cpu"


def test_save_replaces_only_an_earlier_save_or_an_empty_folder(pipe1, tmp_path):
    """Saving replaces the target whole; a folder of the user's other files must never be it."""
    (tmp_path / "file").write_text("precious")
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "a.jpg").write_text("precious")
    with pytest.raises(FileExistsError, match="is a file, not a folder"):
        pipe1.save_pretrained(tmp_path / "file")
    with pytest.raises(FileExistsError, match="a folder with other files in it and no latentdiff.json of an"):
        pipe1.save_pretrained(tmp_path / "photos")
    assert (tmp_path / "file").read_text() == "precious" and (tmp_path / "photos" / "a.jpg").read_text() == "precious"
    # a model folder that diffusers wrote: its model card (and whatever else) must not go with it
    diffusers_folder = save_tiny_pipeline(tmp_path / "sd", "sd1")
    (diffusers_folder / "README.md").write_text("model card")
    with pytest.raises(FileExistsError, match="no latentdiff.json of an earlier save"):
        pipe1.save_pretrained(diffusers_folder)
    assert (diffusers_folder / "README.md").read_text() == "model card"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "photos", "sd"]  # no temporaries left either
    (tmp_path / "empty").mkdir()
    for _ in range(2):  # an empty folder, then the earlier save in it
        assert (pipe1.save_pretrained(tmp_path / "empty") / "model_index.json").is_file()
    with pytest.raises(ValueError, match="dtype must be None, torch.float32, torch.float16 or torch.bfloat16"):
        pipe1.save_pretrained(tmp_path / "int8", dtype=torch.int8)
    kept = dict(pipe1.defaults)
    pipe1.defaults.update(sampler="euler_a", karras=True)  # latentdiff's own: diffusers could not follow it
    with pytest.raises(ValueError, match="defaults euler_a with karras=True have no diffusers twin"):
        pipe1.save_pretrained(tmp_path / "ea")
    pipe1.defaults = kept
    assert not (tmp_path / "ea").exists()
    with pytest.raises(TypeError, match="dtype must be a floating torch.dtype"):
        pipe1.to(dtype="float16")


def test_numpy_seeds_are_seeds(pipe1):
    call = dict(prompt=["a red circle", "a star"], height=SIZE, width=SIZE, steps=2, progress=False)
    expected = pixels(pipe1(**call, seed=[3, 4]))
    assert np.array_equal(pixels(pipe1(**call, seed=np.int64(3))), expected)
    assert np.array_equal(pixels(pipe1(**call, seed=np.array([3, 4]))), expected)


def test_missing_component_folder_is_named(sd1, tmp_path):
    import shutil

    broken = shutil.copytree(sd1, tmp_path / "m")
    shutil.rmtree(broken / "vae")
    with pytest.raises(ValueError, match="no 'vae' component folder"):
        LatentDiffusionPipeline.from_pretrained(broken)


def test_missing_folder(tmp_path):
    with pytest.raises(ValueError, match="model folder not found"):
        LatentDiffusionPipeline.from_pretrained(tmp_path / "nope")


def test_unsupported_config_key_is_named(sd1, tmp_path):
    import shutil

    broken = shutil.copytree(sd1, tmp_path / "m")
    config_path = broken / "unet" / "config.json"
    config = json.loads(config_path.read_text())
    config["class_embed_type"] = "timestep"
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="class_embed_type"):
        LatentDiffusionPipeline.from_pretrained(broken)


def _edit_json(path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def _truncate(path):
    path.write_bytes(path.read_bytes()[:1000])


DAMAGE = {
    "a list": (lambda m: (m / "unet" / "config.json").write_text("[1]"), r"unet/config.json: expected a JSON object"),
    "a string": (
        lambda m: _edit_json(m / "unet" / "config.json", block_out_channels="abc"),
        "unet/config.json: block_out_channels = 'abc' is not a list of integers",
    ),
    "a bool": (
        lambda m: _edit_json(m / "vae" / "config.json", scaling_factor=True),
        "vae/config.json: scaling_factor = True is not a number",
    ),
    "other shapes": (
        lambda m: _edit_json(m / "unet" / "config.json", conv_in_kernel=1),
        r"weights do not fit the model built from its config.json: 1 have other shapes \(conv_in.weight",
    ),
    "truncated": (
        lambda m: _truncate(m / "vae" / "diffusion_pytorch_model.safetensors"),
        "diffusion_pytorch_model.safetensors is not a readable safetensors file .* truncated or damaged",
    ),
    "tokenizer": (
        lambda m: (m / "tokenizer" / "tokenizer.json").write_text("{bad"),
        "tokenizer/tokenizer.json: not valid JSON",
    ),
    "defaults": (
        lambda m: (m / "latentdiff.json").write_text(json.dumps({"defaults": {"steps": -5}})),
        r"latentdiff.json: defaults: steps = -5 is not a positive integer",
    ),
    "a setting": (
        lambda m: (m / "latentdiff.json").write_text(json.dumps({"defaults": {"stepz": 5}})),
        r"latentdiff.json: defaults: unknown setting 'stepz'",
    ),
}


def test_sharded_weights_load_and_a_missing_shard_is_named(sd1, tmp_path):
    """Big components come as shards plus an index (diffusers' and transformers' save_pretrained)."""
    import shutil

    from safetensors.torch import load_file, save_file

    sharded = shutil.copytree(sd1, tmp_path / "m")
    unet = sharded / "unet"
    state = load_file(unet / "diffusion_pytorch_model.safetensors")
    (unet / "diffusion_pytorch_model.safetensors").unlink()
    keys = sorted(state)
    weight_map = {}
    for i, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2 :])):
        name = f"diffusion_pytorch_model-0000{i + 1}-of-00002.safetensors"
        save_file({k: state[k] for k in part}, str(unet / name))
        weight_map |= dict.fromkeys(part, name)
    index = unet / "diffusion_pytorch_model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    loaded = LatentDiffusionPipeline.from_pretrained(sharded).unet.state_dict()
    assert sorted(loaded) == keys and all(torch.equal(loaded[k], state[k].float()) for k in keys)
    # beside an fp16 variant, the full-precision shards are the weights (as diffusers picks them)
    save_file({k: v.half() for k, v in state.items()}, str(unet / "diffusion_pytorch_model.fp16.safetensors"))
    loaded = LatentDiffusionPipeline.from_pretrained(sharded).unet.state_dict()
    assert all(torch.equal(loaded[k], state[k].float()) for k in keys)

    (unet / "diffusion_pytorch_model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ValueError, match="names shard files that are not there: diffusion_pytorch_model-00002"):
        LatentDiffusionPipeline.from_pretrained(sharded)
    index.write_text(json.dumps({"metadata": {}}))
    with pytest.raises(ValueError, match="index.json has no weight_map"):
        LatentDiffusionPipeline.from_pretrained(sharded)


def test_symlinked_component_folders_count_in_the_model_hash(sd1, sd2, tmp_path):
    """A model assembled from links to other models' parts: which parts it links to must change its hash."""
    from latentdiff.folders import folder_hash

    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / "model_index.json").write_bytes((sd1 / "model_index.json").read_bytes())
    for name in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        (linked / name).symlink_to(sd1 / name)
    assert folder_hash(linked) == folder_hash(sd1)
    (linked / "unet").unlink()
    (linked / "unet").symlink_to(sd2 / "unet")
    assert folder_hash(linked) != folder_hash(sd1)


def test_an_inpainting_unet_is_refused_before_loading(sd1, tmp_path):
    import shutil

    folder = shutil.copytree(sd1, tmp_path / "inpaint")
    config = json.loads((folder / "unet" / "config.json").read_text())
    (folder / "unet" / "config.json").write_text(json.dumps({**config, "in_channels": 9}))
    with pytest.raises(ValueError, match="the U-Net takes 9 and makes 4 channels, but the VAE's latents have 4; extra"):
        LatentDiffusionPipeline.from_pretrained(folder)


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_model_folder_is_named(sd1, tmp_path, damage):
    """Each is a ValueError naming the file and what is wrong: the CLI turns it into one line, exit 2."""
    import shutil

    broken = shutil.copytree(sd1, tmp_path / "m")
    harm, message = DAMAGE[damage]
    harm(broken)
    with pytest.raises(ValueError, match=message):
        LatentDiffusionPipeline.from_pretrained(broken)


@pytest.mark.parametrize("suffix", [".bin", ".ckpt", ".pt"])
def test_pickle_weights_are_refused(sd1, tmp_path, suffix):
    import shutil

    broken = shutil.copytree(sd1, tmp_path / "m")
    weights = broken / "unet" / "diffusion_pytorch_model.safetensors"
    weights.rename(weights.with_suffix(suffix))
    with pytest.raises(ValueError, match="safetensors only"):
        LatentDiffusionPipeline.from_pretrained(broken)


def test_stored_sampler_defaults_travel_to_diffusers(sd1, tmp_path):
    import diffusers

    pipe = LatentDiffusionPipeline.from_pretrained(sd1)
    pipe.defaults.update(sampler="euler", karras=True, steps=3, guidance_scale=3.0, height=SIZE, width=SIZE)
    saved = pipe.save_pretrained(tmp_path / "m")
    ours = LatentDiffusionPipeline.from_pretrained(saved)("a red circle", seed=[2], progress=False)
    theirs = diffusers.StableDiffusionPipeline.from_pretrained(str(saved), safety_checker=None)
    assert type(theirs.scheduler).__name__ == "EulerDiscreteScheduler" and theirs.scheduler.use_karras_sigmas
    images = run_diffusers(theirs, "a red circle", [2], num_inference_steps=3, guidance_scale=3.0)
    assert np.abs(pixels(ours) - pixels(images)).max() <= 3
    plain = pipe("a red circle", seed=[2], karras=False, progress=False)
    assert not np.array_equal(pixels(ours), pixels(plain))
