"""What makes sampling fast: the masks' clean-up on the sampling device, and generation's ``--compile`` levers.

`finish_masks` turns a batch of decoded mask logits into the clean 0/1 masks that `DualPipeline` returns:
Gaussian smoothing, the threshold at 0, the largest 4-connected component and its holes filled.  On a GPU it
runs in torch on the logits' device (`clean_masks`), so only the finished uint8 masks cross to the host; on the
CPU scipy does it (`smooth_mask_logits`, `quality.largest_component`), which is faster there.  Both give the
same masks: the torch smoothing reproduces scipy's ``gaussian_filter`` (its kernel, ``reflect`` edges, float64
sums rounded to float32 after each axis) and its components come from union–find whose labels are each
component's first pixel in raster order, as scipy numbers them, so ties between equal components go the same way.

`speed_up` applies the levers of ``jobs/generate.py --compile`` to a loaded pipeline: fused QKV projections,
channels-last memory format and `torch.compile` of the UNet and the VAE decoder, and of a ControlNet that steers
the UNet (Inductor in its deterministic mode, so the same settings give the same kernels, hence the same bytes,
run after run).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from skindual.quality import largest_component

MASK_CLEANUPS = ("auto", "torch", "scipy")
TRUNCATE = 4.0  # scipy.ndimage.gaussian_filter's default: the kernel reaches 4 σ


def gaussian_kernel(sigma: float, device=None) -> torch.Tensor:
    """scipy's 1-D Gaussian kernel for `sigma` (radius ``int(4 σ + 0.5)``), float64, summing to 1."""
    radius = int(TRUNCATE * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64, device=device)
    phi = torch.exp(-0.5 / sigma**2 * x**2)
    return phi / phi.sum()


def _reflect_index(size: int, radius: int, device) -> torch.Tensor:
    """Indices of a line of `size` padded by `radius` on each side the way scipy's ``reflect`` mode pads
    (d c b a | a b c d | d c b a), for any radius."""
    i = torch.arange(-radius, size + radius, device=device) % (2 * size)
    return torch.where(i >= size, 2 * size - 1 - i, i)


def smooth_logits(logits: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian smoothing (σ in pixels) of N×H×W logits, each image on its own, on their device: float32 out,
    as scipy's ``gaussian_filter`` of each float32 image (rows first, then columns)."""
    if sigma <= 0 or not len(logits):
        return logits.float()
    kernel = gaussian_kernel(sigma, logits.device)
    radius = (len(kernel) - 1) // 2
    x = logits.to(torch.float64)[:, None]  # N×1×H×W
    for axis in (2, 3):
        x = x.index_select(axis, _reflect_index(x.shape[axis], radius, x.device))
        weight = kernel.view(1, 1, -1, 1) if axis == 2 else kernel.view(1, 1, 1, -1)
        x = F.conv2d(x, weight).to(torch.float32).to(torch.float64)  # scipy keeps each pass in the input's dtype
    return x[:, 0].to(torch.float32)


def component_labels(masks: torch.Tensor) -> torch.Tensor:
    """Labels of the 4-connected components of N×H×W boolean masks: each foreground pixel gets the flat index
    (within its image) of its component's first pixel in raster order, each background pixel H·W.

    Union–find in rounds (hook and compress): every pair of 4-neighbours in the foreground whose roots differ
    hooks the larger root under the smaller, then every pointer jumps to its root; a handful of rounds on
    lesion masks, each a few whole-tensor operations, where propagating labels pixel by pixel would take as
    many steps as a component is long.  The root that stays is a component's smallest index."""
    n, h, w = masks.shape
    size = h * w
    parent = torch.arange(n * size, device=masks.device)  # over the whole batch: image b's pixels from b·H·W
    index = parent.view(n, h, w)
    neighbours = [(index[:, :, :-1], index[:, :, 1:], masks[:, :, :-1] & masks[:, :, 1:]),
                  (index[:, :-1], index[:, 1:], masks[:, :-1] & masks[:, 1:])]
    a = torch.cat([left[both] for left, _, both in neighbours])
    b = torch.cat([right[both] for _, right, both in neighbours])
    while True:
        root_a, root_b = parent[a], parent[b]
        differ = root_a != root_b
        a, b, root_a, root_b = a[differ], b[differ], root_a[differ], root_b[differ]
        if not len(a):
            break
        parent.scatter_reduce_(0, torch.maximum(root_a, root_b), torch.minimum(root_a, root_b), "amin")
        while True:  # compress: every pointer to its root
            grand = parent[parent]
            if torch.equal(grand, parent):
                break
            parent = grand
    first = parent.view(n, h, w) - (torch.arange(n, device=masks.device) * size).view(n, 1, 1)
    return torch.where(masks, first, size)


def largest_components(masks: torch.Tensor, fill_holes: bool = True) -> torch.Tensor:
    """Each N×H×W boolean mask's largest 4-connected component (ties: the one that starts first in raster
    order), its holes (background not 4-connected to the border) filled: `quality.largest_component`, batched."""
    n, h, w = masks.shape
    if not n:
        return masks.bool()
    labels = component_labels(masks.bool()).view(n, h * w)
    counts = torch.zeros(n, h * w + 1, dtype=torch.int64, device=masks.device)
    counts.scatter_add_(1, labels, torch.ones_like(labels))
    counts[:, -1] = 0  # the background
    keep = (labels == counts.argmax(1, keepdim=True)) & (labels < h * w)
    keep = keep.view(n, h, w)
    if not fill_holes:
        return keep
    outside = component_labels(~keep).view(n, h * w)  # the background's components
    border = torch.zeros(h, w, dtype=torch.bool, device=masks.device)
    border[0], border[-1], border[:, 0], border[:, -1] = True, True, True, True
    reached = torch.zeros(n, h * w + 1, dtype=torch.bool, device=masks.device)
    reached.scatter_(1, outside[:, border.view(-1)], True)
    reached[:, -1] = False  # the label of the kept component's pixels
    return ~reached.gather(1, outside).view(n, h, w)


def smooth_mask_logits(logits: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian smoothing (σ in pixels) of N×H×W decoded mask logits, each image on its own (scipy).

    A VAE decoder fed a generated mask latent draws its edge with spikes and notches about a latent
    cell wide; smoothing before the threshold removes them and keeps the shape (what it buys on the
    demo: lab/notes/demo-results.md)."""
    from scipy import ndimage

    if sigma <= 0:
        return logits
    return np.stack([ndimage.gaussian_filter(m, sigma) for m in logits]) if len(logits) else logits


def finish_masks(mask_logits: torch.Tensor, sigma: float, largest: bool = True, where: str = "auto") -> np.ndarray:
    """Decoded N×H×W mask logits → uint8 0/1 masks N×H×W on the host: smoothed by a Gaussian of σ pixels,
    thresholded at 0 and, with `largest`, cut to their largest component with holes filled.  `where`: "auto"
    (torch on the logits' device when it is not the CPU, else scipy), "torch" or "scipy"."""
    if where not in MASK_CLEANUPS:
        raise ValueError(f"mask clean-up {where!r}: choose one of {MASK_CLEANUPS}")
    if where == "torch" or (where == "auto" and mask_logits.device.type != "cpu"):
        return clean_masks(mask_logits, sigma, largest).cpu().numpy()
    masks = (smooth_mask_logits(mask_logits.float().cpu().numpy(), sigma) > 0).astype(np.uint8)
    if largest and len(masks):
        masks = np.stack([largest_component(m) for m in masks])
    return masks


def clean_masks(mask_logits: torch.Tensor, sigma: float, largest: bool = True) -> torch.Tensor:
    """`finish_masks` in torch, on the logits' device: uint8 0/1 masks N×H×W there."""
    masks = smooth_logits(mask_logits, sigma) > 0
    if largest:
        masks = largest_components(masks)
    return masks.to(torch.uint8)


# --------------------------------------------------------------------------- the --compile levers

LEVERS = ("fuse_qkv", "channels_last", "compile")


def speed_up(pipe, levers: tuple[str, ...] | list[str] = LEVERS, controlnet=None) -> None:
    """Apply the named `levers` (of `LEVERS`) to a loaded diffusers pipeline whose LoRA, if any, is fused, in place:
    ``fuse_qkv``: the LoRA layers folded away, then each attention's Q, K, V (cross-attention: K, V) projections
    one matmul (diffusers' `fuse_qkv_projections`, UNet and VAE); ``channels_last``: the UNet's and VAE's
    weights in channels-last memory format; ``compile``: `torch.compile` of the UNet's and the VAE decoder's
    forward (Inductor, deterministic mode; compiled on first use, again for a new batch size once, then with a
    dynamic batch).  A `controlnet` (diffusers' `ControlNetModel`) that steers the pipeline's UNet gets the same
    three."""
    unknown = set(levers) - set(LEVERS)
    if unknown:
        raise ValueError(f"unknown levers {sorted(unknown)}; choose from {LEVERS}")
    steering = [controlnet] if controlnet is not None else []
    if "fuse_qkv" in levers:
        if getattr(pipe.unet, "peft_config", None):  # LoRA merged into the weights by fuse_lora: drop the wrappers
            from peft.tuners.tuners_utils import BaseTunerLayer

            if not all(m.merged for m in pipe.unet.modules() if isinstance(m, BaseTunerLayer)):
                raise ValueError("fuse_qkv needs the LoRA fused into the weights first (fuse_lora)")
            pipe.unload_lora_weights()
        for model in (pipe.unet, pipe.vae, *steering):
            model.fuse_qkv_projections()
    if "channels_last" in levers:
        for model in (pipe.unet, pipe.vae, *steering):
            model.to(memory_format=torch.channels_last)
    if "compile" in levers:
        import torch._inductor.config as inductor

        if hasattr(inductor, "deterministic"):  # where torch has it: no kernel chosen by timing, the same bytes
            inductor.deterministic = True
        for model in (pipe.unet, pipe.vae.decoder, *steering):
            model.compile()

