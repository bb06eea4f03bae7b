"""Peak memory of one fine-tuning step of SD-2-base at its exact size, 512², per setting.

SD-2-base's architecture is built in code with random weights (`skindual.sd2`: 866 M UNet, 84 M VAE,
23-layer text encoder), saved once, and each setting runs in a fresh process: `JointTrainer` (LoRA
rank 16, channels layout), one optimiser step on a batch of demo-like pairs at 512².  What is
measured: on a GPU `torch.cuda.max_memory_allocated` over the step (after the model is loaded and
the peak reset); on the CPU the process's peak resident set (VmHWM) over the step, the peak reset
once the model is loaded (``/proc/self/clear_refs``), less the resident set of the same process
before it loaded anything (Python, torch, diffusers: not on a GPU).  The baseline of the ratio is
measured in the same run: fp32, the geometry term decoding the whole mask (the old default).

    python bench/realsize_memory.py [--quick] [--no-batch4] [--width 1] [--warmup W --steps N] [--only SETTING ...]
    python bench/realsize_memory.py --warmup 2 --steps 3 --only bf16_b8 bf16_b8_consistency bf16_b8_consistency_default   # GPU

The batch-8 settings (the fine-tune's defaults, with and without the reward) run only when named in ``--only``:
on a CPU a step of them takes minutes.  ``--warmup`` untimed steps come first (a GPU's first steps pay for
kernel selection), then ``--steps`` timed ones; the peak covers all of them.

The last line is one JSON object: ``peak_gb_batch1`` (bf16, default loss terms, batch 1),
``gb_per_extra_sample`` (bf16 batch 2 − batch 1), ``consistency_gb_batch1`` / ``consistency_gb_per_extra_sample`` /
``consistency_step_seconds_ratio`` (the consistency reward on every sample, against bf16_b1),
``resnet_lora_gb_batch1`` / ``resnet_lora_gb_per_extra_sample`` / ``resnet_lora_step_seconds_ratio`` (LoRA on the
ResNet blocks and feed-forwards too, against bf16_b1), ``controlnet_gb_batch1`` / ``controlnet_gb_per_extra_sample`` /
``controlnet_step_seconds_ratio`` / ``controlnet_parameters`` / ``unet_parameters`` (--train controlnet, against
bf16_b1; ``controlnet_bf16_b8`` only when named in ``--only``), ``bf16_b8_consistency[_default]_step_seconds_ratio``
(the reward on every sample / at its default t <= 200, against bf16_b8), ``reserved_gb`` (on a GPU: the allocator's reserved peak of each setting), ``max_batch_24gb`` (the largest batch of that
setting under 24 GB: batch 1 + whole extra samples), ``gb_per_extra_sample_fp32`` (fp32 batch 2 − batch 1;
`skindual.finetune.STEP_MEMORY_GB` is built from these figures), ``device``, ``ratio`` (bf16 default ÷ the fp32
full-geometry baseline) and the figure of every setting (GB); ``generate_bf16_b*``: one generation
call's peak in bf16 at 512² (guidance on, decoded 4 latents at a time).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GB = 1024**3

# name → (FinetuneConfig settings, batch size); the default loss terms are w_img, w_mask and w_geo (0.1)
SETTINGS = {
    "bf16_b1": ({"mixed_precision": "bf16"}, 1),
    "bf16_b2": ({"mixed_precision": "bf16"}, 2),
    "fp32_b1": ({"mixed_precision": "no"}, 1),
    "fp32_b2": ({"mixed_precision": "no"}, 2),
    "fp32_b1_full_geometry": ({"mixed_precision": "no", "geo_crop": 0}, 1),  # the baseline
    "bf16_b1_no_geometry": ({"mixed_precision": "bf16", "w_geo": 0.0}, 1),
    "bf16_b1_full_geometry": ({"mixed_precision": "bf16", "geo_crop": 0}, 1),
    "bf16_b1_prior": ({"mixed_precision": "bf16", "w_prior": 1.0}, 1),
    "bf16_b1_checkpointing": ({"mixed_precision": "bf16", "gradient_checkpointing": True}, 1),
    # LoRA on the ResNet blocks and feed-forwards too (--lora-targets attention+resnet)
    "bf16_b1_resnet_lora": ({"mixed_precision": "bf16", "lora_targets": "attention+resnet"}, 1),
    "bf16_b2_resnet_lora": ({"mixed_precision": "bf16", "lora_targets": "attention+resnet"}, 2),
    "bf16_b2_checkpointing": ({"mixed_precision": "bf16", "gradient_checkpointing": True}, 2),
    "bf16_b4": ({"mixed_precision": "bf16"}, 4),
    "bf16_b8": ({"mixed_precision": "bf16"}, 8),  # the fine-tune's defaults on a GPU: measured, not predicted
    # the consistency reward on every sample (--consistency-max-t 1000: its worst case; at the default 200 a
    # fifth of the samples on average), its segmenter a fresh 128² U-Net of width 16
    "bf16_b1_consistency": ({"mixed_precision": "bf16", "w_consistency": 1.0, "consistency_max_t": 1000}, 1),
    "bf16_b2_consistency": ({"mixed_precision": "bf16", "w_consistency": 1.0, "consistency_max_t": 1000}, 2),
    "bf16_b8_consistency": ({"mixed_precision": "bf16", "w_consistency": 1.0, "consistency_max_t": 1000}, 8),
    # the reward as the fine-tune runs it by default: the samples with t <= 200 of each batch
    "bf16_b8_consistency_default": ({"mixed_precision": "bf16", "w_consistency": 1.0}, 8),
    # --train controlnet: a ControlNet (from the UNet, fp32, AdamW, EMA) beside the frozen bf16 UNet, image term only
    "controlnet_bf16_b1": ({"mixed_precision": "bf16", "train": "controlnet"}, 1),
    "controlnet_bf16_b2": ({"mixed_precision": "bf16", "train": "controlnet"}, 2),
    "controlnet_bf16_b8": ({"mixed_precision": "bf16", "train": "controlnet"}, 8),
    "generate_bf16_b1": ({"generate": True}, 1),  # sampling (guidance: a UNet batch of 2) and decoding
    "generate_bf16_b8": ({"generate": True}, 8),
}
QUICK = ("bf16_b1", "bf16_b2", "fp32_b1", "fp32_b2", "fp32_b1_full_geometry")


def _rss_gb(field: str = "VmRSS") -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024 / GB
    raise RuntimeError(f"no {field} in /proc/self/status")


def child(base: str, name: str, report: str, warmup: str = "0", steps: str = "1") -> None:
    """One setting in this process: load, reset the peak, `warmup` untimed then `steps` timed optimiser steps,
    report the peak over all of them and the mean time of a timed step."""
    import numpy as np
    import torch

    from skindual.finetune_config import FinetuneConfig
    from skindual.finetune_worker import make_trainer

    empty = _rss_gb()
    settings, batch_size = SETTINGS[name]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if settings.get("generate"):
        return generation_peak(base, batch_size, device, empty, report)
    if settings.get("w_consistency"):
        settings = {**settings, "consistency_segmenter": str(Path(base).parent / "qc")}
    cfg = FinetuneConfig(base_model=base, batch_size=batch_size, resolution=512, lora_rank=16,
                         use_gpu=device.type == "cuda", **settings)
    trainer = make_trainer(cfg, device)  # a JointTrainer, or a ControlNetTrainer for train=controlnet
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:512, :512]
    mask = (((yy - 256) ** 2 + (xx - 240) ** 2) < 150**2).astype(np.uint8)
    batch = {"image": rng.integers(0, 256, (batch_size, 512, 512, 3), dtype=np.uint8),
             "mask": np.stack([mask] * batch_size), "prompt": np.array(["a dermoscopy image of melanoma"] * batch_size)}
    loaded = _rss_gb()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := the current resident set
    for _ in range(int(warmup)):  # a GPU's first steps pay for kernel selection and the allocator's growth
        trainer.train_step(batch)
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(int(steps)):
        metrics = trainer.train_step(batch)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - started) / int(steps)
    extra = {}
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / GB
        extra["reserved_gb"] = round(torch.cuda.max_memory_reserved() / GB, 2)
    else:
        peak = _rss_gb("VmHWM") - empty
    extra |= {"trained_parameters": sum(p.numel() for p in trainer.params),
              "unet_parameters": sum(p.numel() for p in trainer.unet.parameters())}
    Path(report).write_text(json.dumps({"peak_gb": round(peak, 2), "loaded_gb": round(loaded - empty, 2),
                                        "step_seconds": round(seconds, 3), "loss": metrics["total"], **extra}))


def generation_peak(base: str, batch_size: int, device, empty: float, report: str) -> None:
    """The peak of one generation call (2 steps: the peak does not grow with steps) of the widened base in
    bf16 at 512², `batch_size` pairs, decoded 4 latents at a time (`DualPipeline`'s default)."""
    import torch

    from skindual.dual_pipeline import DualPipeline

    pipe = DualPipeline.from_pretrained(base, device=str(device), dtype=torch.bfloat16, resolution=512)
    loaded = _rss_gb()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")
    started = time.perf_counter()
    pipe(["a dermoscopy image of melanoma"] * batch_size, list(range(batch_size)), steps=2, guidance=4.0)
    seconds = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated() / GB if device.type == "cuda" else _rss_gb("VmHWM") - empty
    Path(report).write_text(json.dumps({"peak_gb": round(peak, 2), "loaded_gb": round(loaded - empty, 2),
                                        "step_seconds": round(seconds, 1), "loss": None}))


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), "unknown CPU")
    return f"cpu ({model}, {os.cpu_count()} cores; resident set, not GPU memory)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)}")
    parser.add_argument("--no-batch4", action="store_true", help="skip the direct bf16 batch-4 measurement")
    parser.add_argument("--width", type=int, default=1, help="1: SD-2's size (other widths: a quick check)")
    parser.add_argument("--warmup", type=int, default=0, help="untimed steps before the timed ones (on a GPU: 2)")
    parser.add_argument("--steps", type=int, default=1, help="timed steps of each setting (their mean is the step time)")
    parser.add_argument("--only", nargs="*", default=[], choices=list(SETTINGS), metavar="SETTING",
                        help="measure only these settings (bf16_b1 and bf16_b2 are always measured)")
    args = parser.parse_args()
    names = [n for n in (QUICK if args.quick else SETTINGS)  # batch 8: on request (--only)
             if not (args.no_batch4 and n == "bf16_b4") and not n.startswith(("bf16_b8", "controlnet_bf16_b8"))]
    if args.only:
        names = [n for n in SETTINGS if n in {"bf16_b1", "bf16_b2", "fp32_b1_full_geometry", *args.only}]
    from skindual.sd2 import save_sd2_pipeline

    figures = {}
    with tempfile.TemporaryDirectory(prefix="skindual-sd2-") as tmp:
        base = str(save_sd2_pipeline(Path(tmp) / "sd2-base", "base", width=args.width))
        if any(SETTINGS[n][0].get("w_consistency") for n in names):
            import torch

            from skindual.downstream import SmallUNet
            from skindual.qc_model import QCModelConfig, write_segmenter

            torch.manual_seed(0)
            write_segmenter(QCModelConfig(output=str(Path(tmp) / "qc"), size=128), SmallUNet(16), {"val_dice": None})
        for name in names:
            report = Path(tmp) / f"{name}.json"
            subprocess.run([sys.executable, __file__, "--child", base, name, str(report), str(args.warmup),
                            str(args.steps)], check=True, cwd=ROOT)
            figures[name] = json.loads(report.read_text())
            print(f"{name:<28} peak {figures[name]['peak_gb']:6.2f} GB (resident after loading "
                  f"{figures[name]['loaded_gb']:.2f} GB), {figures[name]['step_seconds']:.3f} s a step", flush=True)
    b1, b2 = figures["bf16_b1"]["peak_gb"], figures["bf16_b2"]["peak_gb"]
    per_sample = max(b2 - b1, 1e-6)
    summary = {"device": device_name(), "width": args.width, "resolution": 512,
               "peak_gb_batch1": b1, "gb_per_extra_sample": round(per_sample, 2),
               "max_batch_24gb": 1 + int((24 - b1) // per_sample) if b1 <= 24 else 0,
               "predicted_gb_batch4": round(b1 + 3 * per_sample, 2),
               **({"gb_per_extra_sample_fp32": round(figures["fp32_b2"]["peak_gb"] - figures["fp32_b1"]["peak_gb"], 2)}
                  if {"fp32_b1", "fp32_b2"} <= set(figures) else {}),
               **({"consistency_gb_batch1": figures["bf16_b1_consistency"]["peak_gb"],
                   "consistency_gb_per_extra_sample": round(figures["bf16_b2_consistency"]["peak_gb"]
                                                            - figures["bf16_b1_consistency"]["peak_gb"], 2),
                   "consistency_step_seconds_ratio": round(figures["bf16_b1_consistency"]["step_seconds"]
                                                           / max(figures["bf16_b1"]["step_seconds"], 1e-9), 2)}
                  if {"bf16_b1_consistency", "bf16_b2_consistency"} <= set(figures) else {}),
               **({"resnet_lora_gb_batch1": figures["bf16_b1_resnet_lora"]["peak_gb"],
                   "resnet_lora_gb_per_extra_sample": round(figures["bf16_b2_resnet_lora"]["peak_gb"]
                                                            - figures["bf16_b1_resnet_lora"]["peak_gb"], 2),
                   "resnet_lora_step_seconds_ratio": round(figures["bf16_b1_resnet_lora"]["step_seconds"]
                                                           / max(figures["bf16_b1"]["step_seconds"], 1e-9), 2)}
                  if {"bf16_b1_resnet_lora", "bf16_b2_resnet_lora"} <= set(figures) else {}),
               **({"controlnet_gb_batch1": figures["controlnet_bf16_b1"]["peak_gb"],
                   "controlnet_gb_per_extra_sample": round(figures["controlnet_bf16_b2"]["peak_gb"]
                                                           - figures["controlnet_bf16_b1"]["peak_gb"], 2),
                   "controlnet_step_seconds_ratio": round(figures["controlnet_bf16_b1"]["step_seconds"]
                                                          / max(figures["bf16_b1"]["step_seconds"], 1e-9), 2),
                   "controlnet_parameters": figures["controlnet_bf16_b1"]["trained_parameters"],
                   "unet_parameters": figures["controlnet_bf16_b1"]["unet_parameters"]}
                  if {"controlnet_bf16_b1", "controlnet_bf16_b2"} <= set(figures) else {}),
               **({f"{n}_step_seconds_ratio": round(figures[n]["step_seconds"] / max(figures["bf16_b8"]["step_seconds"], 1e-9), 3)
                   for n in ("bf16_b8_consistency", "bf16_b8_consistency_default") if n in figures and "bf16_b8" in figures}),
               "ratio": round(b1 / figures["fp32_b1_full_geometry"]["peak_gb"], 3),
               "baseline": "fp32_b1_full_geometry", "peak_gb": {n: f["peak_gb"] for n, f in figures.items()},
               "step_seconds": {n: f["step_seconds"] for n, f in figures.items()},
               **({"reserved_gb": {n: f["reserved_gb"] for n, f in figures.items() if "reserved_gb" in f}}
                  if any("reserved_gb" in f for f in figures.values()) else {}),
               "warmup": args.warmup, "steps": args.steps}
    print(json.dumps(summary))


if __name__ == "__main__":
    if len(sys.argv) in (5, 7) and sys.argv[1] == "--child":
        child(*sys.argv[2:])
    else:
        main()
