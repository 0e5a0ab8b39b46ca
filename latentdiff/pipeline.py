"""LatentDiffusionPipeline: prompt -> text context -> guided denoising in latent space -> VAE decode -> PIL."""

from __future__ import annotations

import functools
import math
import numbers
import os
import random
import threading
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from latentdiff import __version__, folders
from latentdiff import pair as pairing
from latentdiff import workers as parallel
from latentdiff.attention import inference_cache
from latentdiff.clip import CLIPTextEncoder, CLIPTextSettings
from latentdiff.config import read_json, write_json
from latentdiff.devices import check_device
from latentdiff.fingerprint import module_fingerprint
from latentdiff.metadata import attach
from latentdiff.prompts import MAX_SEED
from latentdiff.replay import Replay, Signature
from latentdiff.samplers import SAMPLERS, make_sampler
from latentdiff.schedules import ScheduleConfig
from latentdiff.text import encode_prompts
from latentdiff.tokenizer import CLIPTokenizer
from latentdiff.unet import UNet, UNetConfig
from latentdiff.vae import VAE, VAEConfig

FALLBACK_DEFAULTS = {"steps": 25, "guidance_scale": 7.5, "sampler": "dpmpp_2m"}
CONTEXT_CACHE_SIZE = 256  # text contexts kept per pipeline (prompts reused across calls: the empty negative)
# Stable Diffusion folders store CLIP text weights under this prefix (transformers 5 drops it in memory);
# we write it so that every transformers version reads our folders.
CLIP_PREFIX = "text_model."
BUNDLED_MODEL = Path(__file__).resolve().parent.parent / "weights" / "shapes-tiny"


def _one_call_at_a_time(method):
    """Calls on one pipeline from several threads (a web server's workers) wait their turn: a call keeps its
    caches on the shared modules (attention.inference_cache, the text contexts, the step traces), and two at
    once would tear them (a TypeError mid-call, seen). Re-entrant: a callback may encode or call again."""

    @functools.wraps(method)
    def in_turn(self, *args, **kwargs):
        with self._turn:
            return method(self, *args, **kwargs)

    return in_turn


# Every pipeline with a lock: a forked child gets new ones (as logging does for its handlers). A thread of the
# parent that is mid-call holds its pipeline's lock, and the child has no such thread to release it: the
# child's first call would wait forever.
_WITH_TURNS: weakref.WeakSet = weakref.WeakSet()


def _new_turn(pipe) -> None:
    pipe._turn = threading.RLock()
    _WITH_TURNS.add(pipe)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=lambda: [_new_turn(pipe) for pipe in list(_WITH_TURNS)])


class LatentDiffusionPipeline:
    """Text-to-image with a VAE, a CLIP text encoder and a conditional U-Net (Rombach et al. 2022)."""

    def __init__(
        self,
        unet: UNet,
        vae: VAE,
        text_encoder,
        tokenizer,
        scheduler_config: ScheduleConfig,
        defaults: dict[str, Any] | None = None,
        name: str | None = None,
        source: Path | None = None,
    ):
        if not isinstance(defaults, (dict, type(None))):
            raise TypeError(f"defaults must be a dict of sampling settings or None, got {defaults!r}")
        check_defaults(defaults or {}, "defaults")  # a bad one would fail every call, or a later from_pretrained
        _check_parts(unet.config, vae.config, getattr(text_encoder.config, "hidden_size", None))
        self.unet = unet.eval()
        self.vae = vae.eval()
        self.text_encoder = text_encoder.eval()
        self.tokenizer = tokenizer
        self.scheduler_config = scheduler_config
        self.defaults = {**FALLBACK_DEFAULTS, **(defaults or {})}
        self.model_name = name or "latentdiff"
        self.source = source  # the folder it was loaded from, for the model hash
        self._model_hash: str | None = None
        self._loaded_weights = self._weights_state() if source is not None else None  # as read from `source`
        self._context_cache: dict[tuple[str, int | None], torch.Tensor] = {}
        self._context_state: tuple | None = None  # what the cached contexts were made with
        # Repeated U-Net steps replayed from a TorchScript trace (replay.py): CPU, small U-Nets, same images.
        self.trace_steps = True
        self._replay = Replay()
        _new_turn(self)  # see _one_call_at_a_time

    def __getstate__(self) -> dict[str, Any]:  # copy.deepcopy: a lock is not copied, the copy gets its own
        return {key: value for key, value in self.__dict__.items() if key != "_turn"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        _new_turn(self)

    # ---- sizes -------------------------------------------------------------------------------------
    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def size_multiple(self) -> int:
        """Pixel sizes must be multiples of the VAE's factor; the U-Net takes any latent size, as diffusers'."""
        return self.vae_scale_factor

    @property
    def native_size(self) -> int:
        return self.unet.config.sample_size * self.vae_scale_factor

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def model_hash(self) -> str | None:
        """The hash of the folder the weights came from; None once they changed in memory (written in place,
        swapped, LoRA-wrapped): that folder would no longer make the same images, so no image may claim it."""
        if self.source is None or self._weights_state() != self._loaded_weights:
            return None
        if self._model_hash is None:
            self._model_hash = folders.folder_hash(self.source)
        return self._model_hash

    def _weights_state(self) -> tuple:
        return tuple(module_fingerprint(m, versions=True) for m in (self.unet, self.vae, self.text_encoder))

    # ---- folders -----------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path | None = None, device=None, dtype=None) -> LatentDiffusionPipeline:
        """Load a diffusers-layout folder (SD 1.x/2.x style, fp32 or fp16 safetensors); None: the bundled model."""
        if path is None:
            path = BUNDLED_MODEL
            if not path.is_dir():
                raise folders.ModelFolderError(
                    f"the bundled default model is not in this checkout ({path}); pass a model folder"
                )
        root = folders.check_model_root(path)
        configs = read_configs(root)  # every config checked before any weight is read
        unet_dir = folders.component_dir(root, "unet")
        vae_dir = folders.component_dir(root, "vae")
        text_dir = folders.component_dir(root, "text_encoder")
        tokenizer_dir = folders.component_dir(root, "tokenizer")

        scheduler_raw, scheduler_config = configs["scheduler_raw"], configs["scheduler"]
        unet = UNet(configs["unet"])
        folders.load_weights(unet, unet_dir, folders.WEIGHT_STEMS["unet"])
        vae = VAE(configs["vae"])
        folders.load_weights(vae, vae_dir, folders.WEIGHT_STEMS["vae"])
        text_encoder = CLIPTextEncoder(configs["text_encoder"], configs["text_encoder_raw"])
        # Older transformers saved the position_ids buffer; newer ones rebuild it.
        folders.load_weights(
            text_encoder, text_dir, folders.WEIGHT_STEMS["text_encoder"], ignore=("position_ids",), prefix=CLIP_PREFIX
        )
        tokenizer = CLIPTokenizer.from_folder(tokenizer_dir)

        stored = folders.read_defaults(root)
        check_defaults(stored.get("defaults") or {}, f"{root / folders.DEFAULTS_FILE}: defaults")
        defaults = dict(stored.get("defaults") or {})
        # a diffusers folder samples with its scheduler class (and its Karras flag) unless the call says otherwise
        own = {cls: name for name, cls in folders.DIFFUSERS_SCHEDULERS.items()}.get(scheduler_raw.get("_class_name"))
        if own is not None and "sampler" not in defaults:
            defaults["sampler"] = own
        if scheduler_raw.get("use_karras_sigmas") and "karras" not in defaults:
            defaults["karras"] = SAMPLERS[defaults.get("sampler", FALLBACK_DEFAULTS["sampler"])].supports_karras
        pipe = cls(
            unet,
            vae,
            text_encoder,
            tokenizer,
            scheduler_config,
            defaults=defaults,
            name=stored.get("name") or root.resolve().name,
            source=root,
        )
        pipe.to(device=device, dtype=dtype)
        pipe._loaded_weights = pipe._weights_state()  # at `dtype` is how this folder loads at `dtype`
        return pipe

    def save_pretrained(self, path: str | Path, dtype: torch.dtype | None = None) -> Path:
        """Write a diffusers-layout folder that StableDiffusionPipeline.from_pretrained also reads."""
        if dtype not in (None, torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"dtype must be None, torch.float32, torch.float16 or torch.bfloat16, got {dtype!r}")
        if self.defaults.get("karras") and self.defaults["sampler"] == "euler_a":  # latentdiff's own extension
            raise ValueError(
                "defaults euler_a with karras=True have no diffusers twin (its EulerAncestralDiscreteScheduler has "
                "no Karras sigmas), so the folder would sample differently there; save with karras off or another "
                "sampler in pipe.defaults"
            )

        def write(tmp: Path) -> None:
            sampler = self.defaults["sampler"]
            write_json(tmp / "model_index.json", folders.model_index(folders.DIFFUSERS_SCHEDULERS[sampler]))
            for name in folders.COMPONENTS:
                (tmp / name).mkdir()
            write_json(tmp / "unet" / "config.json", self.unet.config.to_dict())
            folders.save_weights(self.unet, tmp / "unet" / "diffusion_pytorch_model.safetensors", dtype)
            write_json(tmp / "vae" / "config.json", self.vae.config.to_dict())
            folders.save_weights(self.vae, tmp / "vae" / "diffusion_pytorch_model.safetensors", dtype)
            write_json(tmp / "text_encoder" / "config.json", self.text_encoder.config_dict())
            text_weights = tmp / "text_encoder" / "model.safetensors"
            folders.save_weights(self.text_encoder, text_weights, dtype, prefix=CLIP_PREFIX)
            self.tokenizer.save(tmp / "tokenizer")
            scheduler = self.scheduler_config.to_dict()
            scheduler["_class_name"] = folders.DIFFUSERS_SCHEDULERS[sampler]
            if self.defaults.get("karras"):  # diffusers then samples as our defaults do
                scheduler["use_karras_sigmas"] = True
            write_json(tmp / "scheduler" / "scheduler_config.json", scheduler)
            write_json(tmp / folders.DEFAULTS_FILE, {"name": self.model_name, "defaults": self.defaults})

        # only a latentdiff save is replaced: a diffusers folder may hold a model card, safety checker, variants
        return folders.write_folder_atomically(path, write, marker=folders.DEFAULTS_FILE)

    def to(self, device=None, dtype=None) -> LatentDiffusionPipeline:
        if isinstance(device, torch.dtype) and dtype is None:  # pipe.to(torch.float16), as diffusers takes it
            device, dtype = None, device
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"dtype must be a floating torch.dtype (e.g. torch.float16), got {dtype!r}")
        if device is not None:
            device = check_device(device)  # before any module moves: a bad device leaves the pipeline whole
        # Still the folder's weights after the move when they were before and no value changes on the way, or
        # only as loading at the new dtype would change it (a cast down); the records say dtype and device.
        # A cast back up is not: the rounding stays, so loading the folder at that dtype gives other weights.
        as_loaded = self.source is not None and self._weights_state() == self._loaded_weights
        as_loaded = as_loaded and (dtype is None or _precision(dtype) <= _precision(self.dtype))
        as_loaded = as_loaded and dtype not in _SIBLINGS.get(self.dtype, ())
        for module in (self.unet, self.vae, self.text_encoder):
            module.to(device=device, dtype=dtype)
        if as_loaded:
            self._loaded_weights = self._weights_state()
        self._context_cache.clear()
        return self

    # ---- generation --------------------------------------------------------------------------------
    @_one_call_at_a_time
    def encode(self, prompts: str | list[str], clip_skip: int | None = None) -> torch.Tensor:
        """Text context for each prompt; repeated prompts (the empty negative above all) are encoded once."""
        prompts = _as_prompt_list(prompts, "prompts")  # a str is one prompt, not one per character
        # the cached contexts hold for this text encoder and tokenizer as they were: changed weights (in place
        # too), a swapped or LoRA-wrapped module, another tokenizer make them stale
        state = (id(self.tokenizer), module_fingerprint(self.text_encoder, versions=True))
        if state != self._context_state:
            self._context_cache.clear()
            self._context_state = state
        found = {}
        for prompt in dict.fromkeys(prompts):
            key = (prompt, clip_skip)
            context = self._context_cache.pop(key, None)
            if context is None:
                # One prompt per text-encoder call: a batch could change the last bits of the result,
                # and an image must not depend on which other prompts share its batch.
                context = encode_prompts(self.tokenizer, self.text_encoder, [prompt], clip_skip)[0]
            found[prompt] = self._context_cache[key] = context  # re-inserted: the newest entry
        while len(self._context_cache) > CONTEXT_CACHE_SIZE:  # bounded: a long prompt file must not grow it
            self._context_cache.pop(next(iter(self._context_cache)))  # the least recently used
        return torch.stack([found[p] for p in prompts]).to(self.dtype)

    @torch.no_grad()
    @_one_call_at_a_time
    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        steps: int | None = None,
        guidance_scale: float | None = None,
        sampler: str | None = None,
        karras: bool | None = None,
        seed: int | list[int] | None = None,
        num_images_per_prompt: int = 1,
        clip_skip: int | None = None,
        eta: float = 0.0,
        progress: bool = True,
        callback=None,
        workers: int | None = None,
    ) -> list[Image.Image]:
        """Images for `prompt`; `callback(i, t, x)` (if given) sees the latents after each step.

        `workers`: CPU processes, one torch thread each: a batch is cut across them, a single guided image
        runs its unconditional and conditional U-Net rows in two (None: one per torch thread on Linux with
        2-4 threads, 2 exactly for a single image, for U-Nets up to 50M parameters; else 1). The images do
        not change.
        """
        prompts = _as_prompt_list(prompt, "prompt")
        negatives = _negatives(negative_prompt, len(prompts))
        height = self.defaults.get("height", self.native_size) if height is None else height
        width = self.defaults.get("width", self.native_size) if width is None else width
        steps = self.defaults["steps"] if steps is None else steps
        guidance_scale = self.defaults["guidance_scale"] if guidance_scale is None else guidance_scale
        sampler_name = self.defaults["sampler"] if sampler is None else sampler
        if karras is None:  # the stored default applies only to the stored sampler
            karras = bool(self.defaults.get("karras")) and sampler_name == self.defaults["sampler"]
        self._check_call(height, width, steps, sampler_name, num_images_per_prompt)
        _check_numbers(guidance_scale, eta, karras)
        if clip_skip is not None and not _is_int(clip_skip):
            raise TypeError(f"clip_skip must be None or a whole number of layers, got {clip_skip!r}")
        if callback is not None and not callable(callback):
            raise TypeError(f"callback must be callable as callback(i, t, x), got {callback!r}")
        # numpy's numbers pass the checks; Python's go on, into the images' JSON records too
        height, width, steps, num_images_per_prompt, guidance_scale, eta, clip_skip, workers = (
            v.item() if isinstance(v, np.generic) else v
            for v in (height, width, steps, num_images_per_prompt, guidance_scale, eta, clip_skip, workers)
        )
        options = {"eta": eta} if sampler_name == "ddim" else {}
        # here, not in a worker: a step count this schedule cannot take is the caller's mistake, said at once
        make_sampler(sampler_name, self.scheduler_config, karras=karras, **options).set_timesteps(steps)
        if workers is not None:
            parallel.check_workers(workers, self.device, callback)

        # 1. One entry per image, prompts-major: image k = (prompt k // n, its k % n-th image).
        n = num_images_per_prompt
        image_prompts = [p for p in prompts for _ in range(n)]
        image_negatives = [p for p in negatives for _ in range(n)]
        seeds = _seeds(seed, len(image_prompts))

        # 2. Text context; the unconditional half only when guidance is on (guidance_scale > 1).
        context = self.encode(image_prompts, clip_skip)
        uncond = self.encode(image_negatives, clip_skip) if guidance_scale > 1.0 else None

        def render(start: int, stop: int, show: bool, pair: bool = False) -> np.ndarray:
            schedule = make_sampler(sampler_name, self.scheduler_config, karras=karras, **options)
            schedule.set_timesteps(steps)
            part = context[start:stop] if uncond is None else torch.cat([uncond[start:stop], context[start:stop]])
            x = self._denoise(schedule, part, seeds[start:stop], height, width, guidance_scale, show, callback, pair)
            return self._pixels(x)

        # 3. The images, in one process or on the CPU across several: a batch is cut into slices, one
        #    guided image runs its two U-Net rows apart; either way each image comes out the same.
        count, guided = len(image_prompts), uncond is not None
        if workers is None:
            size = sum(p.numel() for p in self.unet.parameters())
            workers = 1 if callback is not None else parallel.auto_workers(count, self.device, guided, size)
        threads = torch.get_num_threads()
        latent = (self.unet.config.in_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        pair = workers > 1 and count == 1 and guided
        parts = [(0, 1)] if pair else parallel.slices(count, max(1, min(workers, count)))
        rows = 1 if pair or not guided else 2  # the rows of the text context each sample meets in one step
        signatures = [Signature((b - a, *latent), (rows * (b - a), *context.shape[1:]), rows) for a, b in parts]
        self._replay.prepare(self.unet, signatures, enabled=self.trace_steps and callback is None)
        if pair:
            try:
                pixels, processes = render(0, 1, progress, pair=True), 2
            except pairing.PartnerLost as error:
                pairing.warn_restart(error)
                pixels, processes = render(0, 1, progress), 1
        elif min(workers, count) > 1:
            processes = min(workers, count)
            pixels = parallel.render_split(render, count, (height, width, 3), processes, progress)
        else:
            pixels, processes = render(0, count, progress), 1
        images = [Image.fromarray(a) for a in pixels]
        model_hash = self.model_hash  # once: it checks every tensor of the three modules
        records = [
            {
                "prompt": p,
                "negative_prompt": neg,
                "steps": steps,
                "sampler": sampler_name,
                "karras": karras,
                "eta": eta if sampler_name == "ddim" else None,
                "guidance_scale": guidance_scale,
                "seed": s,
                "width": width,
                "height": height,
                "clip_skip": clip_skip,
                "model": self.model_name,
                "model_hash": model_hash,
                "latentdiff_version": __version__,
                # How the batch was computed: the last bits of an image depend on the shape of the work
                # it was part of (CPU kernels pick their algorithm by batch size and threads), not on the
                # other images, so `latentdiff reproduce` repeats that shape to get the same pixels.
                "batch_size": count,
                "batch_index": k,
                "workers": processes,
                "threads": threads,
            }
            for k, (p, neg, s) in enumerate(zip(image_prompts, image_negatives, seeds))
        ]
        return [attach(image, record) for image, record in zip(images, records)]

    def _denoise(self, schedule, context, seeds, height, width, guidance_scale, progress, callback, pair=False):
        """Latents for len(seeds) images; `context` holds the unconditional rows first when guided. `pair`:
        the two rows run in two processes (pair.py)."""
        # Initial noise per image from its own CPU generator: independent of batch size and device.
        shape = (1, self.unet.config.in_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        x_start = torch.cat([torch.randn(shape, generator=g) for g in generators])
        x_start = (x_start * schedule.init_noise_sigma).to(self.device, self.dtype)
        guided = guidance_scale > 1.0

        def unet(sample, t, rows, repeats):
            return self._replay.step(self.unet, sample, t, rows, repeats)

        def loop(role: int, exchange) -> torch.Tensor:
            # Reverse diffusion, with classifier-free guidance (Ho & Salimans 2022). The weights and the
            # context are fixed for the call: fused attention weights and the context's k, v are made once.
            # Both halves share x, so the U-Net runs its layers before the first cross-attention once.
            x, n = x_start, len(seeds)
            rows = context[:n] if role == pairing.PARENT else context[n:]  # one tensor: k, v cached on it
            # No tqdm at all without a bar: even a disabled one takes tqdm's lock, which a forked worker
            # (workers.py, pair.py) may have inherited held by the parent's tqdm monitor thread.
            bar = progress and role == pairing.PARENT
            timesteps = tqdm(schedule.timesteps, desc="denoising", leave=False) if bar else schedule.timesteps
            with inference_cache(self.unet):
                for i, t in enumerate(timesteps):
                    model_in = schedule.scale_model_input(x, t)
                    if exchange is not None:
                        out_uncond, out_cond = exchange(unet(model_in, t, rows, 1), i)
                    elif guided:
                        out_uncond, out_cond = unet(model_in, t, context, 2).chunk(2)
                    if guided:
                        model_output = out_uncond + guidance_scale * (out_cond - out_uncond)
                    else:
                        model_output = unet(model_in, t, context, 1)
                    x = schedule.step(model_output, t, x, generators=generators)
                    if callback is not None and role == pairing.PARENT:
                        callback(i, t, x)
            return x

        if pair:
            return pairing.run_pair(loop, tuple(x_start.shape), self.dtype)
        return loop(pairing.PARENT, None)

    @torch.no_grad()
    def decode_latents(self, x: torch.Tensor) -> list[Image.Image]:
        return [Image.fromarray(a) for a in self._pixels(x)]

    def _pixels(self, x: torch.Tensor) -> np.ndarray:
        """Latents -> pixels in [-1, 1] -> uint8 (N, H, W, 3), rounded as diffusers does."""
        shift = self.vae.config.shift_factor or 0.0
        pixels = self.vae.decode(x / self.vae.config.scaling_factor + shift)
        arrays = (pixels / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().cpu().numpy()
        return (arrays * 255).round().astype(np.uint8)

    def _check_call(self, height: int, width: int, steps, sampler: str, n: int) -> None:
        m = self.size_multiple
        for name, value in (("height", height), ("width", width)):
            if not _is_int(value):
                raise TypeError(f"{name} must be a whole number of pixels, got {value!r}")
        if height <= 0 or width <= 0 or height % m or width % m:
            raise ValueError(
                f"size {width}x{height} is not possible with this model: width and height must be positive "
                f"multiples of {m} (e.g. {max(m, round(width / m) * m)}x{max(m, round(height / m) * m)})"
            )
        if not _is_int(steps) or steps <= 0:
            raise ValueError(f"steps must be a positive integer, got {steps!r}")
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; choose from {sorted(SAMPLERS)}")
        if not _is_int(n) or n <= 0:
            raise ValueError(f"num_images_per_prompt must be a positive integer, got {n!r}")


def read_configs(root: Path) -> dict[str, Any]:
    """The components' configs of a model folder, parsed and checked against each other, as loading reads
    them (`latentdiff info` shows the same problems): scheduler(_raw), unet, vae, text_encoder(_raw)."""
    scheduler_file = folders.component_dir(root, "scheduler") / "scheduler_config.json"
    scheduler_raw = read_json(scheduler_file)
    text_file = folders.component_dir(root, "text_encoder") / "config.json"
    text_raw = read_json(text_file)
    configs = {
        "scheduler_raw": scheduler_raw,
        "scheduler": ScheduleConfig.from_dict(scheduler_raw, str(scheduler_file)),
        "unet": UNetConfig.from_dict(read_json(folders.component_dir(root, "unet") / "config.json")),
        "vae": VAEConfig.from_dict(read_json(folders.component_dir(root, "vae") / "config.json")),
        "text_encoder_raw": text_raw,
        "text_encoder": CLIPTextSettings.from_dict(text_raw, str(text_file)),
    }
    _check_parts(configs["unet"], configs["vae"], configs["text_encoder"].hidden_size, where=root)
    return configs


def _check_parts(unet: UNetConfig, vae: VAEConfig, text_width: int | None = None, where: Path | str = "pipeline"):
    """Parts that cannot work together: a U-Net that takes or makes other than the VAE's latents, or attends
    to a context of another width than the text encoder's (a first call would fail deep in torch)."""
    latent = vae.latent_channels
    if unet.in_channels != latent or unet.out_channels != latent:
        raise folders.ModelFolderError(
            f"{where}: the U-Net takes {unet.in_channels} and makes {unet.out_channels} channels, but the VAE's "
            f"latents have {latent}; extra input channels mean an inpainting or instruct-pix2pix model, "
            "which latentdiff does not run (text-to-image models only)"
        )
    if text_width is not None and unet.cross_attention_dim != text_width:
        raise folders.ModelFolderError(
            f"{where}: the U-Net attends to a context {unet.cross_attention_dim} wide, but the text encoder "
            f"makes {text_width}; they are parts of different models"
        )


# Bits of mantissa: a cast to fewer loses nothing that loading at that dtype would keep; fp16 and bf16 round
# differently from each other (siblings), so a cast between them is never that.
def _precision(dtype: torch.dtype) -> int:
    return {torch.float64: 52, torch.float32: 23, torch.float16: 10, torch.bfloat16: 7}.get(dtype, 0)


_SIBLINGS = {torch.float16: (torch.bfloat16,), torch.bfloat16: (torch.float16,)}


def check_defaults(defaults: dict[str, Any], where: str) -> None:
    """Stored sampling defaults must be usable: a bad one would fail every call, or make noise, not an error."""
    checks = {
        "sampler": (lambda v: v in SAMPLERS, f"one of {sorted(SAMPLERS)}"),
        "steps": (lambda v: _is_int(v) and v > 0, "a positive integer"),
        "guidance_scale": (lambda v: _is_number(v) and math.isfinite(v), "a finite number"),
        "height": (lambda v: _is_int(v) and v > 0, "a positive integer"),
        "width": (lambda v: _is_int(v) and v > 0, "a positive integer"),
        "karras": (lambda v: isinstance(v, bool), "true or false"),
    }
    if not isinstance(defaults, dict):
        raise folders.ModelFolderError(f"{where}: expected a JSON object of settings, got {defaults!r}")
    for key, value in defaults.items():
        if key not in checks:
            raise folders.ModelFolderError(f"{where}: unknown setting {key!r}; latentdiff knows {sorted(checks)}")
        ok, wanted = checks[key]
        if not ok(value):
            raise folders.ModelFolderError(f"{where}: {key} = {value!r} is not {wanted}")


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)  # numpy's ints too


def _check_numbers(guidance_scale, eta, karras) -> None:
    """The real-valued settings: a NaN guidance scale or a negative eta would make noise, not an error."""
    for name, value, low in (("guidance_scale", guidance_scale, -math.inf), ("eta", eta, 0.0)):
        if not _is_number(value) or not math.isfinite(value) or value < low:
            wanted = "a finite number" if low == -math.inf else f"a finite number >= {low:g}"
            raise ValueError(f"{name} must be {wanted}, got {value!r}")
    if karras is not None and not isinstance(karras, bool):
        raise TypeError(f"karras must be True, False or None, got {karras!r}")


def _as_list(value) -> list | None:
    """The items of a list, tuple or other iterable (a numpy array); None for a string or a non-iterable."""
    if isinstance(value, (str, bytes)):
        return None
    try:
        return list(value)
    except TypeError:
        return None


def _as_prompt_list(prompt, what: str) -> list[str]:
    prompts = [prompt] if isinstance(prompt, str) else _as_list(prompt)
    if prompts is None:
        raise TypeError(f"{what} must be a str or a list of str, got {type(prompt).__name__}")
    if not prompts:
        raise ValueError(f"{what} list is empty; give at least one prompt")
    bad = [p for p in prompts if not isinstance(p, str)]
    if bad:
        raise TypeError(f"{what} must be a str or a list of str, got {type(bad[0]).__name__}")
    return prompts


def _negatives(negative_prompt, count: int) -> list[str]:
    if negative_prompt is None:
        return [""] * count
    if isinstance(negative_prompt, str):
        return [negative_prompt] * count
    negatives = _as_prompt_list(negative_prompt, "negative_prompt")
    if len(negatives) != count:
        raise ValueError(
            f"got {len(negatives)} negative prompts for {count} prompts; give one for all or one per prompt"
        )
    return negatives


def _seeds(seed, count: int) -> list[int]:
    if seed is None:
        seed = random.SystemRandom().randrange(2**32)
    seeds = [int(seed) + k for k in range(count)] if _is_int(seed) else _as_list(seed)  # int: numpy's would wrap
    if seeds is None or not all(_is_int(s) for s in seeds):
        raise TypeError(f"seed must be an int or a list of ints, got {seed!r}")
    if len(seeds) != count:
        raise ValueError(f"got {len(seeds)} seeds for {count} images; give one seed or one per image")
    bad = next((k for k, s in enumerate(seeds) if not 0 <= s <= MAX_SEED), None)
    if bad is not None:
        raise ValueError(
            f"seeds must be between 0 and {MAX_SEED} (what torch.Generator takes); image {bad + 1} would get "
            f"{seeds[bad]}"
        )
    return [int(s) for s in seeds]
