"""U-Net steps replayed from a trace: the same bits as the eager steps, made only when shapes repeat, and
dropped whenever what the trace baked in may have changed."""

import numpy as np
import pytest
import torch

from latentdiff import LatentDiffusionPipeline
from latentdiff import workers as parallel
from latentdiff.replay import REPEATS_BEFORE_TRACING, Replay, Signature
from latentdiff.testing.tiny import save_tiny_pipeline

SIZE = 32
CALL = dict(height=SIZE, width=SIZE, steps=3, seed=5, progress=False)


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def folder(request, tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp(request.param) / "m", request.param, seed=2)


def pixels(images):
    return np.stack([np.asarray(im) for im in images])


def pair(folder):
    """Two pipelines on the same weights: one replays its steps, the other never does."""
    replaying, eager = LatentDiffusionPipeline.from_pretrained(folder), LatentDiffusionPipeline.from_pretrained(folder)
    eager.trace_steps = False
    return replaying, eager


def good_traces(pipe) -> list[Signature]:
    return [s for s, trace in pipe._replay.traces.items() if trace is not None and s in pipe._replay.checked]


@pytest.mark.parametrize("guidance, sampler", [(4.0, "dpmpp_2m"), (1.0, "euler_a"), (3.0, "ddim")])
def test_replayed_calls_make_the_eager_images_to_the_bit(folder, guidance, sampler):
    replaying, eager = pair(folder)
    call = dict(CALL, guidance_scale=guidance, sampler=sampler, workers=1)
    prompts = ["a red circle", "two blue stars"]
    expected = pixels(eager(prompts, **call))
    assert np.array_equal(pixels(replaying(prompts, **call)), expected) and good_traces(replaying) == []
    for _ in range(REPEATS_BEFORE_TRACING):  # one call makes the trace, checking it on its first step
        assert np.array_equal(pixels(replaying(prompts, **call)), expected)
    rows, side = (2 if guidance > 1 else 1), SIZE // replaying.vae_scale_factor
    assert good_traces(replaying) == [Signature((2, 4, side, side), (rows * 2, 77, 32), rows)]


@pytest.mark.skipif(not parallel.can_fork(), reason="worker processes are forked, on Linux only")
def test_worker_processes_replay_the_traces_made_before_the_fork(folder):
    """3 images on 2 processes: slices of 2 and 1, so two shapes, both traced in the parent."""
    replaying, eager = pair(folder)
    call = dict(CALL, guidance_scale=4.0, workers=2)
    prompts = ["a", "b", "c"]
    expected = pixels(eager(prompts, **call))
    for _ in range(REPEATS_BEFORE_TRACING + 1):
        assert np.array_equal(pixels(replaying(prompts, **call)), expected)
    assert sorted(s.sample[0] for s in replaying._replay.traces) == [1, 2]
    single = dict(CALL, guidance_scale=4.0, workers=2)  # one guided image: its two rows in two processes
    for _ in range(REPEATS_BEFORE_TRACING + 1):
        assert np.array_equal(pixels(replaying("a", **single)), pixels(eager("a", **single)))
    side = SIZE // replaying.vae_scale_factor
    assert Signature((1, 4, side, side), (1, 77, 32), 1) in good_traces(replaying)


@pytest.fixture
def unet(tmp_path):
    return LatentDiffusionPipeline.from_pretrained(save_tiny_pipeline(tmp_path / "m", "sd1", seed=4)).unet


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 4, 8, 8, generator=g), torch.tensor(500), torch.randn(2, 77, 32, generator=g)


SIG = Signature((1, 4, 8, 8), (2, 77, 32), 2)


def prepare_until_traced(replay: Replay, unet) -> None:
    for _ in range(REPEATS_BEFORE_TRACING - 1):
        replay.prepare(unet, [SIG])
        assert SIG not in replay.traces  # not seen often enough yet to be worth half a second
    replay.prepare(unet, [SIG])
    assert replay.traces[SIG] is not None


def traced_replay(unet) -> Replay:
    replay = Replay()
    with torch.no_grad():
        prepare_until_traced(replay, unet)
    return replay


@torch.no_grad()
def test_weights_changed_in_place_are_seen_and_replaced_ones_drop_the_traces(unet):
    replay = traced_replay(unet)
    x, t, context = inputs()
    assert torch.equal(replay.step(unet, x, t, context, 2), unet(x, t, context, sample_repeats=2))
    assert SIG in replay.checked
    unet.conv_in.weight.add_(0.5)  # an optimizer step, a LoRA merge, load_state_dict: the same tensor
    assert torch.equal(replay.step(unet, x, t, context, 2), unet(x, t, context, sample_repeats=2))
    unet.conv_in.weight = torch.nn.Parameter(unet.conv_in.weight * 2)  # a new tensor the trace never saw
    prepare_until_traced(replay, unet)  # dropped, and traced again once the shapes keep coming
    assert torch.equal(replay.step(unet, x, t, context, 2), unet(x, t, context, sample_repeats=2))


@torch.no_grad()
def test_modules_swapped_hooked_or_switched_to_training_drop_the_traces(unet):
    replay = traced_replay(unet)
    unet.conv_out = torch.nn.Conv2d(unet.conv_out.in_channels, unet.conv_out.out_channels, 3, padding=1)
    prepare_until_traced(replay, unet)  # dropped: the shapes must keep coming on the changed U-Net
    unet.conv_in.forward = lambda x: torch.zeros_like(x)  # code patched in: the trace would not run it
    replay.prepare(unet, [SIG])
    assert replay.traces == {}
    del unet.conv_in.forward
    handle = unet.conv_in.register_forward_hook(lambda module, args, out: out * 0)
    for _ in range(REPEATS_BEFORE_TRACING):
        replay.prepare(unet, [SIG])
    assert replay.traces == {}  # a hook would have run once, while tracing: never traced
    handle.remove()
    unet.train()
    prepare_until_traced(replay, unet)
    assert replay.fingerprint[0][0][2] is True
    x, t, context = inputs()
    assert torch.equal(replay.step(unet, x, t, context, 2), unet(x, t, context, sample_repeats=2))


@torch.no_grad()
def test_a_trace_that_gives_other_bits_is_dropped_for_good(unet):
    replay = traced_replay(unet)
    real = replay.traces[SIG]

    def off_by_a_bit(*args):
        return torch.nextafter(real(*args), torch.tensor(float("inf")))

    replay.traces[SIG] = off_by_a_bit
    x, t, context = inputs()
    assert torch.equal(replay.step(unet, x, t, context, 2), unet(x, t, context, sample_repeats=2))
    assert replay.traces[SIG] is None
    replay.prepare(unet, [SIG])
    assert replay.traces[SIG] is None  # not traced again for this U-Net
    assert torch.equal(replay.step(unet, x, t, context, 2), unet(x, t, context, sample_repeats=2))


def test_no_trace_with_autograd_on_when_switched_off_or_compiled(unet):
    replay = Replay()
    for _ in range(3):
        replay.prepare(unet, [SIG])  # gradients on: a trace would record a graph to differentiate
    assert replay.traces == {}
    with torch.no_grad():
        for _ in range(3):
            replay.prepare(unet, [SIG], enabled=False)
        assert replay.traces == {} and replay.seen == {}  # switched off: not even counted
        prepare_until_traced(replay, unet)
        replay.prepare(unet, [SIG], enabled=False)  # one call with a callback, say: eager, traces kept
        x, t, context = inputs()
        assert not replay.active and replay.traces[SIG] is not None
        assert torch.equal(replay.step(unet, x, t, context, 2), unet(x, t, context, sample_repeats=2))
        assert SIG not in replay.checked  # the step was eager: the trace did not run
        replay.traces.clear()
        compiled = torch.compile(unet)  # not run: compiling is not what is tested
        for _ in range(3):
            replay.prepare(compiled, [SIG])
    assert replay.traces == {}


@torch.no_grad()
def test_the_shapes_counted_stay_bounded(unet):
    from latentdiff.replay import MAX_SEEN

    replay = Replay()
    sizes = [Signature((1, 4, 8, 8 + k), (2, 77, 32), 2) for k in range(MAX_SEEN + 6)]
    replay.prepare(unet, sizes)
    assert list(replay.seen) == sizes[-MAX_SEEN:] and replay.traces == {}
