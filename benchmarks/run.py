"""latentdiff against diffusers on identical weights, in one process: alternating runs, medians.

    python benchmarks/run.py                      # every row (SD1.5-size rows take many minutes on a CPU)
    python benchmarks/run.py --quick              # fewer repeats, batch 8 only, 256 px only
    python benchmarks/run.py --rows 1,3,4         # pick rows: 1 small model, 2 SD1.5-size, 3 training,
                                                  # 4 cold start, 5 U-Net GFLOP/s; extras: 6 bf16, 7 compile
    python benchmarks/run.py --rows 2 --sizes 256 --json out.json

Ratios are diffusers time / latentdiff time (> 1: latentdiff faster). Pixel differences are the max
absolute difference of the 8-bit images, in 1/255. Model folders are built once and cached under
cache/benchmarks/ (see benchmarks/models.py).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import models  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from timing import alternate, count_flops, matmul_gflops, peak_rss_increase  # noqa: E402

PROMPT = "a red circle to the left of a blue square on a black background"
ROWS: list[dict] = []


def row(**fields) -> None:
    ROWS.append(fields)
    print(" | ".join(f"{k}={_fmt(v)}" for k, v in fields.items()), flush=True)


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def pixels(images) -> np.ndarray:
    return np.stack([np.asarray(im, dtype=np.int16) for im in images])


def max_pixel_diff(a, b) -> int:
    return int(np.abs(pixels(a) - pixels(b)).max())


def rel_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours - ref).abs().max() / ref.abs().max().clamp_min(1e-12))


# ---- pipelines ---------------------------------------------------------------------------------------
def load_pair(folder: Path):
    import diffusers

    from latentdiff.pipeline import LatentDiffusionPipeline

    ours = LatentDiffusionPipeline.from_pretrained(folder)
    theirs = diffusers.StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None, dtype=torch.float32)
    theirs.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(theirs.scheduler.config)
    theirs.set_progress_bar_config(disable=True)
    return ours, theirs


def callers(ours, theirs, batch: int, size: int, steps: int, guidance: float, workers: int | None = None):
    seeds = list(range(batch))
    prompts = [PROMPT] * batch
    common = dict(height=size, width=size, guidance_scale=guidance)

    def run_ours():
        return ours(prompts, seed=seeds, steps=steps, sampler="dpmpp_2m", progress=False, workers=workers, **common)

    def run_theirs():
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        return theirs(prompts, generator=gens, num_inference_steps=steps, output_type="pil", **common).images

    return run_ours, run_theirs


def compare(label: str, fns: dict, repeats: int, **extra) -> dict:
    r = alternate(fns, repeats)
    names = list(fns)
    ours, theirs = r[names[0]], r[names[1]]
    out = dict(
        row=label,
        latentdiff_s=ours["median_s"],
        diffusers_s=theirs["median_s"],
        ratio=theirs["median_s"] / ours["median_s"],
        runs=repeats,
        **extra,
    )
    # Both sides of a round run back to back, so a round's own ratio cancels the drift of this machine's
    # speed (15 % within minutes, session 18); their median and spread say how far the headline holds.
    paired = sorted(t / o for o, t in zip(ours["times"], theirs["times"]))
    if paired:
        out["paired_ratio"] = float(np.median(paired))
        out["paired_range"] = f"{paired[0]:.2f}-{paired[-1]:.2f}"
    a, b = ours["result"], theirs["result"]
    if isinstance(a, list):
        out["max_px_diff"] = max_pixel_diff(a, b)
    elif isinstance(a, torch.Tensor):
        out["max_rel_err"] = rel_error(a, b)
    return out


# ---- rows --------------------------------------------------------------------------------------------
def row_small(args) -> None:
    folder, what = models.small_model()
    print(f"# row 1: {what} ({folder})", flush=True)
    ours, theirs = load_pair(folder)
    size, guidance = ours.defaults.get("height", ours.native_size), ours.defaults["guidance_scale"]
    # A batch is cut across worker processes by default (latentdiff/workers.py); the "one process" row
    # keeps the like-for-like comparison of the two libraries' code on the same threads.
    cases = [(8, None, "")] if args.quick else [(1, None, ""), (8, None, ""), (8, 1, ", one process")]
    for batch, workers, note in cases:
        run_ours, run_theirs = callers(ours, theirs, batch, size, 25, guidance, workers)
        row(**compare(f"1. small e2e b{batch} {size}px 25 dpmpp_2m{note}", {"ours": run_ours, "theirs": run_theirs},
                      args.repeats, model=what))  # fmt: skip
    if 6 in args.rows:
        row_bf16(args, folder, theirs, size, guidance)
    if 7 in args.rows:
        row_compile(args, folder, theirs, size, guidance)


def row_bf16(args, folder, theirs, size, guidance) -> None:
    """Opt-in: the whole latentdiff pipeline in bfloat16 (`--dtype bf16`) against diffusers fp32."""
    from latentdiff.pipeline import LatentDiffusionPipeline

    ours = LatentDiffusionPipeline.from_pretrained(folder, dtype=torch.bfloat16)
    run_ours, run_theirs = callers(ours, theirs, 8, size, 25, guidance)
    row(**compare(f"6. opt-in bf16 small e2e b8 {size}px", {"ours": run_ours, "theirs": run_theirs},
                  args.repeats))  # fmt: skip


def row_compile(args, folder, theirs, size, guidance) -> None:
    """Opt-in: torch.compile on latentdiff's U-Net (compile time excluded: it is in the warm-up)."""
    from latentdiff.pipeline import LatentDiffusionPipeline

    ours = LatentDiffusionPipeline.from_pretrained(folder)
    ours.unet = torch.compile(ours.unet, dynamic=False)
    run_ours, run_theirs = callers(ours, theirs, 8, size, 25, guidance)
    t0 = time.perf_counter()
    run_ours()
    compile_s = time.perf_counter() - t0
    row(**compare(f"7. opt-in torch.compile small e2e b8 {size}px", {"ours": run_ours, "theirs": run_theirs},
                  args.repeats, first_call_s=compile_s))  # fmt: skip


def row_sd15(args) -> None:
    folder = models.sd15_random()
    print(f"# row 2: SD1.5-size random weights ({folder})", flush=True)
    ours, theirs = load_pair(folder)
    sizes = args.sizes or ([256] if args.quick else [256, 512])
    repeats = max(1, min(args.repeats, 3))
    g = torch.Generator().manual_seed(0)
    for size in sizes:
        lat = size // 8
        run_ours, run_theirs = callers(ours, theirs, 1, size, 2, 7.5)
        row(**compare(f"2. SD1.5 e2e {size}px 2 steps", {"ours": run_ours, "theirs": run_theirs}, repeats))
        row(
            row=f"2. SD1.5 peak RSS e2e {size}px (MiB)",
            latentdiff=peak_rss_increase(run_ours),
            diffusers=peak_rss_increase(run_theirs),
        )
        x = torch.randn(2, 4, lat, lat, generator=g)
        ctx = torch.randn(2, 77, 768, generator=g)
        t = torch.tensor(500)
        with torch.no_grad():
            fns = {
                "ours": lambda x=x, t=t, ctx=ctx: ours.unet(x, t, ctx),
                "theirs": lambda x=x, t=t, ctx=ctx: theirs.unet(x, t, ctx).sample,
            }
            row(**compare(f"2. SD1.5 U-Net fwd b2 {lat}x{lat}", fns, repeats))
            z = torch.randn(1, 4, lat, lat, generator=g)
            fns = {
                "ours": lambda z=z: ours.vae.decode(z),
                "theirs": lambda z=z: theirs.vae.decode(z).sample,
            }
            row(**compare(f"2. SD1.5 VAE decode {size}px", fns, repeats))
        if 5 in args.rows:
            row_gflops(ours.unet, x, t, ctx, f"SD1.5 b2 {lat}x{lat}", repeats)


def row_training(args) -> None:
    """Images/s of an AdamW step on the small model's U-Net config, ours and diffusers', same init."""
    from diffusers import UNet2DConditionModel

    from latentdiff.unet import UNet, UNetConfig

    folder, what = models.small_model()
    config = json.loads((folder / "unet" / "config.json").read_text())
    ours = UNet(UNetConfig.from_dict(config))
    theirs = UNet2DConditionModel.from_config(config)
    theirs.load_state_dict(ours.state_dict())
    batch = 8 if args.quick else 32
    g = torch.Generator().manual_seed(0)
    h = config["sample_size"]
    x = torch.randn(batch, config["in_channels"], h, h, generator=g)
    ctx = torch.randn(batch, 32, config["cross_attention_dim"], generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    noise = torch.randn(x.shape, generator=g)

    def stepper(model, unwrap):
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step():
            loss = (unwrap(model(x, t, ctx)) - noise).pow(2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return loss.detach()

        return step

    fns = {"ours": stepper(ours, lambda o: o), "theirs": stepper(theirs, lambda o: o.sample)}
    r = compare(f"3. training step U-Net b{batch} {h}x{h}", fns, args.repeats, model=what)
    r["latentdiff_img_s"] = batch / r["latentdiff_s"]
    r["diffusers_img_s"] = batch / r["diffusers_s"]
    r.pop("max_rel_err", None)  # the two models have drifted apart after different numbers of steps
    row(**r)


def row_cold_start(args) -> None:
    folder, what = models.small_model()
    exe = Path(sys.executable).with_name("latentdiff")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "latentdiff"]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    times, cpu = [], []
    for _ in range(1 if args.quick else 3):
        with tempfile.TemporaryDirectory() as out:
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            t0 = time.perf_counter()
            subprocess.run(
                [*cmd, "generate", "-p", PROMPT, "--model", str(folder), "--out", out, "--quiet"],
                check=True,
                env=env,
                capture_output=True,
            )
            times.append(time.perf_counter() - t0)
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu.append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
            assert list(Path(out).rglob("*.png")), "no PNG written"
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import latentdiff.pipeline"], check=True, env=env)
    import_s = time.perf_counter() - t0
    # cpu_s (user + system time of the process) is the figure a busy shared machine disturbs least
    row(row="4. cold start `latentdiff generate -p` to PNG", median_s=float(np.median(times)),
        min_s=min(times), cpu_s=float(np.median(cpu)), import_pipeline_s=import_s,
        threads=os.environ.get("OMP_NUM_THREADS", "default"), model=what)  # fmt: skip


def row_gflops(unet, x, t, ctx, label: str, repeats: int) -> None:
    with torch.no_grad():
        flops = count_flops(lambda: unet(x, t, ctx))
        r = alternate({"ours": lambda: unet(x, t, ctx)}, repeats)["ours"]
    peak = matmul_gflops()
    achieved = flops / r["median_s"] / 1e9
    row(row=f"5. U-Net GFLOP/s {label}", gflop=flops / 1e9, unet_s=r["median_s"],
        gflops=achieved, matmul_gflops=peak, fraction=achieved / peak)  # fmt: skip


def row_gflops_small(args) -> None:
    from latentdiff.pipeline import LatentDiffusionPipeline

    folder, _ = models.small_model()
    pipe = LatentDiffusionPipeline.from_pretrained(folder)
    cfg = pipe.unet.config
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g)
    ctx = torch.randn(16, 32, cfg.cross_attention_dim, generator=g)
    row_gflops(pipe.unet, x, torch.tensor(500), ctx, f"small b16 {cfg.sample_size}x{cfg.sample_size}",
               args.repeats)  # fmt: skip


def markdown(rows: list[dict]) -> str:
    """The rows as a Markdown table: times, ratio, image/tensor difference, everything else as notes."""
    lines = [
        "| row | latentdiff | diffusers | ratio | difference | notes |",
        "|---|---|---|---|---|---|",
    ]
    main_keys = {"row", "latentdiff_s", "diffusers_s", "ratio", "max_px_diff", "max_rel_err", "times"}
    for r in rows:
        ours = f"{r['latentdiff_s']:.3f} s" if "latentdiff_s" in r else ""
        theirs = f"{r['diffusers_s']:.3f} s" if "diffusers_s" in r else ""
        ratio = f"{r['ratio']:.2f}x" if "ratio" in r else ""
        diff = (
            f"{r['max_px_diff']}/255 px"
            if "max_px_diff" in r
            else (f"{r['max_rel_err']:.1e} rel" if "max_rel_err" in r else "")
        )
        notes = ", ".join(f"{k}={_fmt(v)}" for k, v in r.items() if k not in main_keys)
        lines.append(f"| {r['row']} | {ours} | {theirs} | {ratio} | {diff} | {notes} |")
    return "\n".join(lines)


def whole_numbers(parser, flag: str, text: str, example: str) -> list[int]:
    try:
        return [int(item) for item in text.split(",")]
    except ValueError:
        parser.error(f"{flag} takes whole numbers separated by commas (e.g. {flag} {example}), got {text!r}")


def check_args(parser, args) -> None:
    """Every option, before the first benchmark: a mistake must not cost a run (nor its table, at the end)."""
    args.rows = set(whole_numbers(parser, "--rows", args.rows, "1,3"))
    if not args.rows <= set(range(1, 8)):
        parser.error(f"--rows {','.join(map(str, sorted(args.rows)))}: there are rows 1 to 7 only")
    sizes = args.sizes
    args.sizes = whole_numbers(parser, "--sizes", sizes, "256,512") if sizes else None
    if args.sizes and not all(s >= 8 and s % 8 == 0 for s in args.sizes):
        parser.error(f"--sizes {sizes}: every pixel size must be a positive multiple of 8, e.g. 256,512")
    for flag, value in (("--repeats", args.repeats), ("--threads", args.threads)):
        if value is not None and value < 1:
            parser.error(f"{flag} must be at least 1, got {value}")
    if args.json is not None:
        out = Path(args.json)
        if out.is_dir() or not out.parent.is_dir():
            parser.error(f"--json {out}: give a file path in an existing folder")
        if out.exists() and not earlier_rows(out):
            parser.error(f"--json {out} already exists and is not rows of an earlier run; choose another path")


def earlier_rows(path: Path) -> bool:
    """Whether `path` holds rows this script wrote (a JSON list of objects with a "row"), which a run may replace."""
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(rows, list) and all(isinstance(r, dict) and "row" in r for r in rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default="1,2,3,4,5", help="comma-separated rows (6: bf16, 7: compile)")
    p.add_argument("--quick", action="store_true", help="fewer repeats and sizes")
    p.add_argument("--repeats", type=int, help="timed runs per side (default 5, --quick 2)")
    p.add_argument("--sizes", help="SD1.5-size pixel sizes, e.g. 256,512")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    p.add_argument("--json", help="also write the rows to this file")
    args = p.parse_args(argv)
    check_args(p, args)
    args.repeats = args.repeats or (2 if args.quick else 5)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(
        f"# {time.strftime('%Y-%m-%d %H:%M')} {platform.processor() or platform.machine()} "
        f"{os.cpu_count()} cpus, torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"load {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    if args.rows & {1, 6, 7}:
        row_small(args)
    if 2 in args.rows:
        row_sd15(args)
    if 3 in args.rows:
        row_training(args)
    if 4 in args.rows:
        row_cold_start(args)
    if 5 in args.rows:
        row_gflops_small(args)
    print(markdown(ROWS))
    if args.json:
        Path(args.json).write_text(json.dumps(ROWS, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
