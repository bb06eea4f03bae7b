"""Generation throughput at SD-2-base's size: pairs/s of the joint model vs image-only SD-2, the speed levers, the FLOP floor.

SD-2-base's architecture is built in code with random weights (`skindual.sd2`; throughput does not
depend on the weights).  The joint image–mask model (`DualPipeline`, channels layout, the UNet widened to 8
channels) samples `--steps` DDIM steps with classifier-free guidance and decodes image and mask; the
baseline is diffusers' own `StableDiffusionPipeline` on the same base, dtype, scheduler, steps, guidance and
batch: image-only SD-2 generation.  Attention is PyTorch's scaled-dot-product attention.

What it measures, in this order, each part only while ``--budget-s`` lasts (a part that would not fit is
listed under ``skipped``):
  1. eager PyTorch over ``--batches``: joint pairs/s, image-only images/s, their ratio, the FLOP floor;
  2. where a joint batch's time goes (at ``--lever-batch``, eager): the denoising loop, the image decode, the
     mask decode, the masks' clean-up on the device (`sampling_speed.clean_masks`, what `DualPipeline` does on a
     GPU) and on the CPU (scipy, what it did before), and whether the two clean-ups agree pixel for pixel;
  3. the levers of ``jobs/generate.py --compile`` (`sampling_speed.speed_up`), each arm of ``--arms`` a fresh copy
     of the joint model at ``--lever-batch``, the first (all three levers, what ``--compile`` does) first: its
     pairs/s against eager's, for a compiling arm its compile time (``compile_s``: its 1-step warm-up less eager's),
     and the time to the first shard of ``--shard-pairs`` pairs (``compile_s`` + the shard at its rate) against
     eager's, ``pays_within_shard`` when it is shorter; image-only SD-2 under the first arm's levers (the ratio
     under the same levers) right after it;
  4. the first arm over the other ``--batches`` (one more compile: the batch becomes dynamic).

The FLOP floor: one pair costs 2 × steps UNet evaluations (guidance) plus 2 VAE decodes, counted by
`torch.utils.flop_counter` on this very architecture built on the meta device (no weights, no compute):
SD-2-base at 512² is about 804 GFLOP a UNet evaluation, 2,515 GFLOP a decode, 45.2 TFLOP a pair at 25
steps.  ``floor_fraction`` is pairs/s × FLOP per pair over ``--peak-tflops`` (dense bf16/fp16: about 790
TFLOP/s on H100/H200).  ``peak_gb`` is the measured model's own peak (the other copies are off the GPU).

    python bench/gpu_throughput.py                     # on a GPU: SD-2-base size, 512², 25 steps, bf16
    python bench/gpu_throughput.py --width 16 --resolution 128 --steps 2 --batches 1 2 --lever-batch 2   # CPU check

Every part ends with one JSON line of everything measured so far (the last line is the whole run): the device,
the FLOP counts, ``results`` (one entry per dtype and batch), ``phases``, ``levers``, ``skipped``.
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch

PROMPT = "a dermoscopy image of melanoma, a large dark asymmetric lesion with blue grey areas"
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def flops_of(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def meta_flops(width: int, resolution: int) -> tuple[int, int]:
    """(FLOP of one UNet evaluation, FLOP of one VAE decode) of SD-2-base's architecture at `width` and
    `resolution`, counted on the meta device."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from skindual.sd2 import sd2_configs

    configs, side = sd2_configs("base", width), resolution // 8
    with torch.device("meta"), torch.no_grad():
        unet, vae = UNet2DConditionModel(**configs["unet"]), AutoencoderKL(**configs["vae"])
        latents = torch.randn(1, 4, side, side)
        unet_flops = flops_of(lambda: unet(latents, torch.tensor([500]), torch.randn(1, 77, 1024)))
        vae_flops = flops_of(lambda: vae.decode(latents))
    return unet_flops, vae_flops


class Bench:
    """The models, the device and the clock of one run."""

    def __init__(self, args: argparse.Namespace):
        from diffusers import DDIMScheduler

        from skindual.model import widen_unet
        from skindual.sd2 import build_sd2_pipeline

        self.args, self.started = args, time.perf_counter()
        self.held = 0  # bytes another model keeps on the device while one is measured (not counted in its peak)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.image_only = build_sd2_pipeline("base", args.width)  # the CPU originals: each arm copies them
        self.image_only.scheduler = DDIMScheduler.from_config(self.image_only.scheduler.config)
        self.joint = build_sd2_pipeline("base", args.width)
        widen_unet(self.joint.unet)
        for pipe in (self.image_only, self.joint):
            pipe.set_progress_bar_config(disable=True)
        self.processors = sorted({type(p).__name__ for p in self.image_only.unet.attn_processors.values()})
        unet_flops, vae_flops = meta_flops(args.width, args.resolution)
        self.flops = {"unet_gflop": round(unet_flops / 1e9, 4), "vae_decode_gflop": round(vae_flops / 1e9, 4)}
        self.per_pair = 2 * args.steps * unet_flops + 2 * vae_flops
        self.report = {"device": torch.cuda.get_device_name(0) if self.device.type == "cuda" else "cpu",
                       "width": args.width, "resolution": args.resolution, "steps": args.steps,
                       "guidance": args.guidance, "attention": self.processors, **self.flops,
                       "gflop_per_pair": round(self.per_pair / 1e9, 3), "tflop_per_pair": round(self.per_pair / 1e12, 3),
                       "peak_tflops": args.peak_tflops, "results": [], "phases": {}, "levers": [], "skipped": []}

    def left(self) -> float:
        return self.args.budget_s - (time.perf_counter() - self.started) if self.args.budget_s else float("inf")

    def fits(self, what: str, estimate_s: float) -> bool:
        """Whether a part estimated at `estimate_s` fits the budget left; a part that does not is recorded."""
        if estimate_s <= self.left():
            return True
        self.report["skipped"].append(f"{what} (about {estimate_s:.0f} s, {self.left():.0f} s left)")
        print(f"skipped {what}: about {estimate_s:.0f} s, {self.left():.0f} s of the budget left", flush=True)
        return False

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def clock(self, fn) -> float:
        self.sync()
        started = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - started

    def place(self, pipe, dtype: torch.dtype, levers: tuple[str, ...] = ()):
        """A copy of `pipe`'s UNet and VAE on the device in `dtype` (the text encoder shared), `levers` applied."""
        from skindual.model import place
        from skindual.sampling_speed import speed_up

        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        parts = dict(pipe.components)
        parts["unet"], parts["vae"] = copy.deepcopy(pipe.unet), copy.deepcopy(pipe.vae)
        copy_pipe = type(pipe)(**parts)
        copy_pipe.set_progress_bar_config(disable=True)
        for name in ("unet", "vae", "text_encoder"):  # model.place: diffusers' own .to(dtype) warns for every model
            place(getattr(copy_pipe, name), self.device, dtype)
        speed_up(copy_pipe, levers)
        return copy_pipe

    def alone(self, pipe, other):
        """`pipe` on the device with `other` moved to the host: a peak is the measured model's own."""
        from skindual.model import place

        for model in (other.unet, other.vae):
            place(model, "cpu", model.dtype)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        for model in (pipe.unet, pipe.vae):
            place(model, self.device, model.dtype)
        return pipe

    def rate(self, sample, batch: int) -> dict:
        """`sample(steps)` timed: its 1-step warm-up (compiles, first kernels) and the mean of `--repeats` calls at
        `--steps`: {"first_call_s", "per_s"} with the peak memory of the timed calls."""
        first = self.clock(lambda: sample(1))
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        seconds = sum(self.clock(lambda: sample(self.args.steps)) for _ in range(self.args.repeats)) / self.args.repeats
        out = {"first_call_s": round(first, 3), "per_s": batch / seconds}
        if self.device.type == "cuda":
            out["peak_gb"] = round((torch.cuda.max_memory_allocated() - self.held) / 1024**3, 2)
        return out

    def joint_rate(self, pipe, batch: int) -> dict:
        from skindual.dual_pipeline import DualPipeline

        dual = DualPipeline(pipe, "channels", resolution=self.args.resolution)
        prompts, seeds = [PROMPT] * batch, list(range(batch))
        return self.rate(lambda steps: dual(prompts, seeds, steps=steps, guidance=self.args.guidance), batch)

    def image_rate(self, pipe, batch: int) -> dict:
        args = self.args

        def sample(steps: int) -> None:
            pipe([PROMPT] * batch, num_inference_steps=steps, guidance_scale=args.guidance, height=args.resolution,
                 width=args.resolution, output_type="np", generator=torch.Generator(self.device).manual_seed(0))
        return self.rate(sample, batch)

    def entry(self, dtype: str, batch: int, levers: tuple[str, ...], joint: dict, image: dict | None) -> dict:
        out = {"dtype": dtype, "batch": batch, "levers": "+".join(levers) or "eager",
               "pairs_per_s": round(joint["per_s"], 4),
               "floor_fraction": round(joint["per_s"] * self.per_pair / (self.args.peak_tflops * 1e12), 4),
               "first_call_s": joint["first_call_s"]}
        if image is not None:
            out |= {"image_only_per_s": round(image["per_s"], 4), "ratio": round(joint["per_s"] / image["per_s"], 3)}
        if "peak_gb" in joint:
            out["peak_gb"] = joint["peak_gb"]
        return out

    def emit(self) -> None:
        """Everything measured so far as one JSON line (the last one printed is the run's)."""
        results = self.report["results"]
        self.report["best"] = max(results, key=lambda r: r["pairs_per_s"]) if results else None
        self.report["seconds"] = round(time.perf_counter() - self.started, 1)
        print(json.dumps(self.report), flush=True)


def eager_sweep(bench: Bench, dtype_name: str) -> dict[int, dict]:
    """Part 1: eager joint and image-only over `--batches`; returns the joint entries by batch."""
    args, dtype, by_batch = bench.args, DTYPES[dtype_name], {}
    image_only, joint = bench.place(bench.image_only, dtype), bench.place(bench.joint, dtype)
    for batch in args.batches:
        previous = [r for r in bench.report["results"] if r["levers"] == "eager"]
        estimate = (2.2 * batch * (args.steps + 1) / args.steps / previous[-1]["pairs_per_s"]) if previous else 0
        if not bench.fits(f"eager {dtype_name} batch {batch}", estimate):
            continue
        image = bench.image_rate(bench.alone(image_only, joint), batch)  # each measured alone on the device
        entry = bench.entry(dtype_name, batch, (), bench.joint_rate(bench.alone(joint, image_only), batch), image)
        bench.report["results"].append(entry)
        by_batch[batch] = entry
        print(f"{dtype_name} batch {batch:>2}, eager: {entry['pairs_per_s']:.3f} pairs/s, image-only "
              f"{entry['image_only_per_s']:.3f} images/s (ratio {entry['ratio']:.2f}), "
              f"{100 * entry['floor_fraction']:.1f}% of the FLOP floor", flush=True)
    del image_only, joint
    return by_batch


def phases(bench: Bench, dtype_name: str, batch: int) -> None:
    """Part 2: where an eager joint batch's time goes, and the two mask clean-ups compared."""
    from skindual.dual_pipeline import DualPipeline, pixels
    from skindual.quality import MASK_SMOOTHING
    from skindual.sampling_speed import finish_masks

    args = bench.args
    dual = DualPipeline(bench.place(bench.joint, DTYPES[dtype_name]), "channels", resolution=args.resolution)
    prompts, seeds = [PROMPT] * batch, list(range(batch))
    dual(prompts, seeds, steps=1, guidance=args.guidance)  # warm-up
    kept = {}
    sigma = MASK_SMOOTHING * dual.pipe.vae_scale_factor
    seconds = {
        "denoise": bench.clock(lambda: kept.update(latents=dual.denoise(prompts, seeds, args.steps, args.guidance))),
        "decode_images": bench.clock(lambda: dual.decode(kept["latents"], masks=False)),
        "decode_both": bench.clock(lambda: kept.update(decoded=dual.decode(kept["latents"]))),
        "images_to_host": bench.clock(lambda: pixels(kept["decoded"][0])),
        "first_masks_on_device": bench.clock(lambda: finish_masks(kept["decoded"][1], sigma, where="torch")),
        "masks_on_device": bench.clock(lambda: kept.update(device=finish_masks(kept["decoded"][1], sigma, where="torch"))),
        "masks_scipy": bench.clock(lambda: kept.update(scipy=finish_masks(kept["decoded"][1], sigma, where="scipy"))),
    }
    total = seconds["denoise"] + seconds["decode_both"] + seconds["images_to_host"]  # a batch, less its clean-up
    now, before = total + seconds["masks_on_device"], total + seconds["masks_scipy"]
    bench.report["phases"] = {
        "dtype": dtype_name, "batch": batch, "seconds": {k: round(v, 4) for k, v in seconds.items()},
        "mask_decode_share": round((seconds["decode_both"] - seconds["decode_images"]) / now, 4),
        "cleanup_share_on_device": round(seconds["masks_on_device"] / now, 4),
        "cleanup_share_scipy": round(seconds["masks_scipy"] / before, 4),
        "cleanups_agree": float((kept["device"] == kept["scipy"]).mean()),
    }
    print(f"phases at batch {batch}: " + ", ".join(f"{k} {v:.3f} s" for k, v in seconds.items())
          + f"; clean-ups agree on {100 * bench.report['phases']['cleanups_agree']:.4f}% of pixels", flush=True)


def lever_arms(bench: Bench, dtype_name: str, eager: dict[int, dict]) -> None:
    """Parts 3 and 4: the `--arms` at `--lever-batch` (image-only under the first), the first arm's batch sweep."""
    args, dtype, batch = bench.args, DTYPES[dtype_name], bench.args.lever_batch
    base = eager.get(batch)
    arms = [tuple(a.split("+")) for a in args.arms]
    estimate = 3 * batch * (args.steps + 1) / args.steps / base["pairs_per_s"] if base else 0

    def record(levers, joint_pipe, image=None, at=batch) -> dict:
        entry = bench.entry(dtype_name, at, levers, bench.joint_rate(joint_pipe, at), image)
        reference = eager.get(at)
        if reference is not None:
            entry["speedup"] = round(entry["pairs_per_s"] / reference["pairs_per_s"], 3)
            compile_s = max(0.0, entry["first_call_s"] - reference["first_call_s"]) if "compile" in levers else 0.0
            entry["compile_s"] = round(compile_s, 1)
            shard = args.shard_pairs
            entry["first_shard_s"] = round(entry["compile_s"] + shard / entry["pairs_per_s"], 1)
            entry["eager_first_shard_s"] = round(shard / reference["pairs_per_s"], 1)
            entry["pays_within_shard"] = entry["first_shard_s"] < entry["eager_first_shard_s"]
        bench.report["levers"].append(entry)
        print(f"{entry['levers']} batch {at}: {entry['pairs_per_s']:.3f} pairs/s"
              + (f" (x{entry['speedup']:.2f} eager; compiled in {entry['compile_s']:.0f} s; first shard of "
                 f"{args.shard_pairs} {entry['first_shard_s']:.0f} s vs eager {entry['eager_first_shard_s']:.0f} s)"
                 if "speedup" in entry else ""), flush=True)
        bench.emit()
        return entry

    first = arms[0]  # the full set: its joint rate, then image-only under it, the other arms, then its sweep
    compile_cost = {levers: args.compile_estimate_s if "compile" in levers else 0 for levers in arms}
    if not bench.fits(f"arm {'+'.join(first)} batch {batch}", estimate + compile_cost[first]):
        return
    joint = bench.place(bench.joint, dtype, first)
    record(first, joint)
    # the first arm stays on the device from here (moved, its compiled code would compile again): the other
    # models' peaks are counted above what it holds
    bench.held = torch.cuda.memory_allocated() if bench.device.type == "cuda" else 0
    if bench.fits(f"image-only {'+'.join(first)} batch {batch}", estimate + compile_cost[first]):
        image = bench.image_rate(bench.place(bench.image_only, dtype, first), batch)
        entry = bench.report["levers"][0]
        entry |= {"image_only_per_s": round(image["per_s"], 4),
                  "ratio": round(entry["pairs_per_s"] / image["per_s"], 3)}
        bench.emit()
    for levers in arms[1:]:
        if bench.fits(f"arm {'+'.join(levers)} batch {batch}", estimate + compile_cost[levers]):
            record(levers, bench.place(bench.joint, dtype, levers))
    bench.held = 0
    for other in [b for b in args.batches if b != batch]:
        cost = 3 * other * (args.steps + 1) / args.steps / eager[other]["pairs_per_s"] if other in eager else 0
        if bench.fits(f"arm {'+'.join(first)} batch {other}", cost + compile_cost[first]):
            record(first, joint, at=other)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=1, help="1: SD-2's size; 8, 16: narrow (a quick check)")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 16, 32, 64])
    parser.add_argument("--dtypes", nargs="+", default=["bf16"], choices=list(DTYPES))
    parser.add_argument("--repeats", type=int, default=1, help="timed calls per setting, after a 1-step warm-up")
    parser.add_argument("--lever-batch", type=int, default=16, help="the batch of the phases and of each lever arm")
    parser.add_argument("--arms", nargs="+", default=["fuse_qkv+channels_last+compile", "fuse_qkv", "channels_last",
                                                      "compile"],
                        help="lever sets of sampling_speed.LEVERS, each joined by +, measured against eager; the first "
                             "(generate --compile's: all three) also under image-only and over --batches")
    parser.add_argument("--shard-pairs", type=int, default=730, help="pairs of the shard whose time to first shard "
                                                                     "is reported (35,000 pairs on 16 actors: 730)")
    parser.add_argument("--budget-s", type=float, default=0, help="seconds for the whole run (0: no limit); a part "
                                                                  "that would not fit is skipped")
    parser.add_argument("--compile-estimate-s", type=float, default=90, help="what the budget assumes a compile costs")
    parser.add_argument("--no-phases", action="store_true", help="skip part 2")
    parser.add_argument("--peak-tflops", type=float, default=790.0, help="the device's dense peak, for floor_fraction")
    args = parser.parse_args()
    from skindual.sampling_speed import LEVERS

    for arm in args.arms:
        if not set(arm.split("+")) <= set(LEVERS):
            parser.error(f"--arms {arm}: levers are {', '.join(LEVERS)}, joined by +")
    if args.lever_batch not in args.batches:
        parser.error(f"--lever-batch {args.lever_batch} must be one of --batches")

    bench = Bench(args)
    for name in args.dtypes:
        eager = eager_sweep(bench, name)
        bench.emit()
        estimate = 2.5 * args.lever_batch / eager[args.lever_batch]["pairs_per_s"] if args.lever_batch in eager else 0
        if not args.no_phases and bench.fits(f"phases {name}", estimate):
            phases(bench, name, args.lever_batch)
            bench.emit()
        lever_arms(bench, name, eager)
    bench.emit()


if __name__ == "__main__":
    main()
