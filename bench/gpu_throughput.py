"""Generation throughput at SD-2-base's size: pairs/s of the joint model vs image-only SD-2, and the FLOP floor.

SD-2-base's architecture is built in code with random weights (`skindual.sd2`; throughput does not
depend on the weights).  For each dtype and batch size: the joint image–mask model (`DualPipeline`,
channels layout, the UNet widened to 8 channels) samples `--steps` DDIM steps with classifier-free
guidance and decodes image and mask; the baseline is diffusers' own `StableDiffusionPipeline` on the
same base, dtype, scheduler, steps, guidance and batch: image-only SD-2 generation.  Attention is
PyTorch's scaled-dot-product attention (diffusers' default processor on torch 2); ``--compile``
wraps the UNet in `torch.compile`, ``--channels-last`` sets its memory format.

The FLOP floor: one pair costs 2 × steps UNet evaluations (guidance) plus 2 VAE decodes, counted by
`torch.utils.flop_counter` on this very architecture built on the meta device (no weights, no compute;
attention decomposes into counted matmuls there, whereas on the CPU torch's counter gives fused SDPA 0):
SD-2-base at 512² is about 804 GFLOP a UNet evaluation, 2,515 GFLOP a decode, 45.2 TFLOP a pair at 25
steps.  ``floor_fraction`` is pairs/s × FLOP per pair over ``--peak-tflops`` (dense bf16/fp16: about 790
TFLOP/s measured on H100/H200).  ``peak_gb`` is the joint model's own peak (the image-only pipeline is
off the GPU while the joint one runs).

    python bench/gpu_throughput.py                              # on a GPU: SD-2-base size, 512², 25 steps
    python bench/gpu_throughput.py --compile --channels-last
    python bench/gpu_throughput.py --width 16 --resolution 128 --steps 2 --batches 1 2 --dtypes bf16   # CPU check

The last line is one JSON object: the device, the FLOP count, one entry per (dtype, batch) with
``pairs_per_s``, ``image_only_per_s``, ``ratio`` (joint ÷ image-only) and ``floor_fraction``, and
the best entry.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

PROMPT = "a dermoscopy image of melanoma, a large dark asymmetric lesion with blue grey areas"


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


def timed(fn, repeats: int, device: torch.device) -> float:
    """Seconds per call of `fn` over `repeats` calls, after one warm-up call."""
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - started) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=1, help="1: SD-2's size; 8, 16: narrow (a quick check)")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--dtypes", nargs="+", default=["fp16", "bf16"], choices=["fp16", "bf16", "fp32"])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="torch.compile the UNet")
    parser.add_argument("--channels-last", action="store_true", help="the UNet in channels-last memory format")
    parser.add_argument("--peak-tflops", type=float, default=790.0, help="the device's dense peak, for floor_fraction")
    args = parser.parse_args()

    from diffusers import DDIMScheduler

    from skindual.dual_pipeline import DualPipeline
    from skindual.model import place, widen_unet
    from skindual.sd2 import build_sd2_pipeline

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(torch.get_num_threads())
    dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
    image_only = build_sd2_pipeline("base", args.width)
    image_only.scheduler = DDIMScheduler.from_config(image_only.scheduler.config)
    image_only.set_progress_bar_config(disable=True)
    joint = build_sd2_pipeline("base", args.width)
    widen_unet(joint.unet)
    joint.set_progress_bar_config(disable=True)
    processors = {type(p).__name__ for p in image_only.unet.attn_processors.values()}

    unet_flops, vae_flops = meta_flops(args.width, args.resolution)
    per_pair = 2 * args.steps * unet_flops + 2 * vae_flops

    def on(pipe, dtype):
        """`pipe` alone on the device: the other pipeline back on the CPU, its memory freed."""
        for other in (image_only, joint):
            if other is not pipe:
                other.to("cpu")
        if device.type == "cuda":
            torch.cuda.empty_cache()
        for part in pipe.components.values():  # model.place: diffusers' own .to(dtype) warns for every model
            if isinstance(part, torch.nn.Module):
                place(part, device, dtype)
        if args.channels_last:
            pipe.unet.to(memory_format=torch.channels_last)
        return pipe

    results = []
    for name in args.dtypes:
        dtype = dtypes[name]
        if args.compile:
            joint.unet, image_only.unet = torch.compile(joint.unet), torch.compile(image_only.unet)
        for batch in args.batches:
            prompts, seeds = [PROMPT] * batch, list(range(batch))

            def sample_image_only():
                image_only(prompts, num_inference_steps=args.steps, guidance_scale=args.guidance,
                           height=args.resolution, width=args.resolution, output_type="np",
                           generator=torch.Generator(device).manual_seed(0))

            on(image_only, dtype)
            image_s = timed(sample_image_only, args.repeats, device)
            dual = DualPipeline(on(joint, dtype), "channels", resolution=args.resolution)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            joint_s = timed(lambda: dual(prompts, seeds, steps=args.steps, guidance=args.guidance), args.repeats,
                            device)
            entry = {"dtype": name, "batch": batch, "pairs_per_s": round(batch / joint_s, 4),
                     "image_only_per_s": round(batch / image_s, 4), "ratio": round(image_s / joint_s, 3),
                     "floor_fraction": round(batch / joint_s * per_pair / (args.peak_tflops * 1e12), 4)}
            if device.type == "cuda":
                entry["peak_gb"] = round(torch.cuda.max_memory_allocated() / 1024**3, 2)
            results.append(entry)
            print(f"{name} batch {batch:>2}: {entry['pairs_per_s']:.3f} pairs/s, image-only "
                  f"{entry['image_only_per_s']:.3f} images/s (ratio {entry['ratio']:.2f}), "
                  f"{100 * entry['floor_fraction']:.1f}% of the FLOP floor", flush=True)
    device_name = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"
    print(json.dumps({"device": device_name, "width": args.width, "resolution": args.resolution, "steps": args.steps,
                      "guidance": args.guidance, "attention": sorted(processors), "compile": args.compile,
                      "channels_last": args.channels_last, "unet_gflop": round(unet_flops / 1e9, 4),
                      "vae_decode_gflop": round(vae_flops / 1e9, 4), "gflop_per_pair": round(per_pair / 1e9, 3),
                      "tflop_per_pair": round(per_pair / 1e12, 3),
                      "peak_tflops": args.peak_tflops, "results": results,
                      "best": max(results, key=lambda r: r["pairs_per_s"])}))


if __name__ == "__main__":
    main()
