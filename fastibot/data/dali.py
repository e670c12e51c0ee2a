"""NVIDIA DALI pipeline: JPEG decode, multi-crop augmentation and block masks on the GPU.

``multicrop_graph`` is the augmentation as a plain function of DALI nodes (the
same distribution as ``fastibot.data.transforms``): per crop a random-resized
crop (area and aspect ratio drawn by ``random_crop_generator``, bicubic
resize), colour jitter with p=0.8 (brightness and contrast U(0.6, 1.4),
saturation U(0.8, 1.2), hue ±0.1 of the circle), grayscale p=0.2 (saturation
0), Gaussian blur (sigma U(0.1, 2)) with p=1 / 0.1 / 0.5 for global 1 / the
other globals / locals, solarization p=0.2 on the globals after the first,
horizontal flip p=0.5 and ImageNet normalisation to CHW. ``ibot_pipeline``
wraps it with the file reader (``name="Reader"``, sharded per rank,
``seed = base + rank``) and the decoder (``mixed`` on a GPU: nvJPEG; grayscale
and CMYK JPEGs come out RGB).

Block masks are drawn on the device by the Triton kernel of
``fastibot.kernels.block_mask`` (the reference generator on the CPU) and the
masked-patch index has a fixed size (padding rows weigh 0), so no host sync
and no per-image Python loop remain.

DALI stops on a file it cannot decode, so ``DaliData`` first screens the list
(two small reads per file, in threads): empty files, files whose first bytes are
no known image signature and JPEG/PNG files without their end marker
(truncated downloads) are left out, counted in the first batch's ``n_bad`` and
logged. A file damaged inside its data still decodes (with garbage pixels) or
stops the run with an error that says which loader skips it.

Differences from the torchvision path, by construction: DALI applies the jitter
operations in a fixed order (torchvision shuffles them) and centres contrast on
mid-gray rather than the image mean; DALI's reader shuffles with its own
generator, so a resumed run restores the model exactly but not the data order.
"""
from __future__ import annotations

import logging
import os
import random
import time
from concurrent.futures import ThreadPoolExecutor
from typing import List, Optional, Tuple

import torch

from .datasets import DataError, list_images
from .batch import make_batch, row_capacity
from .masking import MaskGenerator, mask_grid

log = logging.getLogger("fastibot")

MEAN_255 = [0.485 * 255, 0.456 * 255, 0.406 * 255]
STD_255 = [0.229 * 255, 0.224 * 255, 0.225 * 255]


_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"BM", b"II*\x00", b"MM\x00*", b"P2", b"P3", b"P5", b"P6")


def readable(path: str) -> bool:
    """Cheap check that DALI's decoder will not stop on ``path``: a known signature and, for JPEG and PNG,
    the end marker near the end of the file (a truncated file lacks it)."""
    try:
        with open(path, "rb") as f:
            head = f.read(12)
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 64))
            tail = f.read()
    except OSError:
        return False
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return True
    if not any(head.startswith(sig) for sig in _SIGNATURES):
        return False
    if head.startswith(b"\xff\xd8"):
        return b"\xff\xd9" in tail
    if head.startswith(b"\x89PNG"):
        return b"IEND" in tail
    return True


def screen_files(samples: List[Tuple[str, int]], threads: int = 16) -> Tuple[List[Tuple[str, int]], List[str]]:
    """(samples DALI can read, paths left out)."""
    with ThreadPoolExecutor(max(1, threads)) as pool:
        ok = list(pool.map(readable, (p for p, _ in samples), chunksize=256))
    return [s for s, good in zip(samples, ok) if good], [p for (p, _), good in zip(samples, ok) if not good]


def _crop(images, shape, size: int, scale, blur_p: float, solarize_p: float, with_params: bool):
    from nvidia.dali import fn, types

    anchor, extent = fn.random_crop_generator(shape, random_area=list(scale), random_aspect_ratio=[3 / 4, 4 / 3])
    start = fn.cast(anchor, dtype=types.FLOAT)
    x = fn.resize(images, roi_start=start, roi_end=start + fn.cast(extent, dtype=types.FLOAT), size=[size, size],
                  interp_type=types.INTERP_CUBIC, antialias=True)
    jitter = fn.random.coin_flip(probability=0.8)
    gray = fn.random.coin_flip(probability=0.2)
    brightness = jitter * fn.random.uniform(range=[0.6, 1.4]) + (1 - jitter)
    contrast = jitter * fn.random.uniform(range=[0.6, 1.4]) + (1 - jitter)
    saturation = (jitter * fn.random.uniform(range=[0.8, 1.2]) + (1 - jitter)) * (1 - gray)
    hue = jitter * fn.random.uniform(range=[-36.0, 36.0])  # degrees: ±0.1 of the hue circle
    x = fn.color_twist(x, brightness=brightness, contrast=contrast, saturation=saturation, hue=hue)
    # the blur and the solarization run only on the samples that drew them (DALI conditionals split the batch
    # and merge it again): the pixels stay uint8 throughout, none are blurred only to be thrown away
    twisted = x
    blurred = fn.random.coin_flip(probability=blur_p, dtype=types.BOOL)
    if blurred:
        x = fn.gaussian_blur(x, sigma=fn.random.uniform(range=[0.1, 2.0]))
    colour = x  # (size, size, 3) uint8: what solarization, flip and normalisation act on
    solarized = fn.random.coin_flip(probability=solarize_p, dtype=types.BOOL)
    if solarized:  # PIL's solarize: values >= 128 of 255 become 255 - value, darker ones stay
        x = fn.cast(x + (x >= 128) * (255 - 2 * fn.cast(x, dtype=types.INT16)), dtype=types.UINT8)
    flip = fn.random.coin_flip(probability=0.5)
    out = fn.crop_mirror_normalize(x, dtype=types.FLOAT, output_layout="CHW", mean=MEAN_255, std=STD_255,
                                   mirror=flip)
    if not with_params:
        return [out]
    return [out, extent, shape, flip, gray, jitter, blurred, solarized, colour, twisted]


def multicrop_graph(images, shape, crops, with_params: bool = False) -> List:
    """All crops of one image batch (globals first); with ``with_params`` each crop also returns
    its window extent, the image shape, its flip / grayscale / jitter / blur / solarize draws, its
    pixels before solarization and flip and those before the blur (HWC, 0-255), so tests can check what
    each step does. It branches per sample: the pipeline that calls it needs ``enable_conditionals=True``."""
    outs = []
    for i in range(crops.n_global + crops.n_local):
        if i < crops.n_global:
            blur_p, sol_p = (1.0, 0.0) if i == 0 else (0.1, 0.2)
            outs += _crop(images, shape, crops.global_size, crops.global_scale, blur_p, sol_p, with_params)
        else:
            outs += _crop(images, shape, crops.local_size, crops.local_scale, 0.5, 0.0, with_params)
    return outs


def build_pipeline(files, labels, crops, batch_size: int, shard_id: int, num_shards: int, seed: int,
                   device_id, num_threads: int = 4, with_params: bool = False):
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=seed,
                  prefetch_queue_depth=2, enable_conditionals=True)
    def ibot_pipeline():
        jpegs, lab = fn.readers.file(files=files, labels=labels, shard_id=shard_id, num_shards=num_shards,
                                     random_shuffle=True, name="Reader", seed=seed)
        shape = fn.peek_image_shape(jpegs)
        images = fn.decoders.image(jpegs, device="mixed" if device_id is not None else "cpu",
                                   output_type=types.RGB)
        return tuple(multicrop_graph(images, shape, crops, with_params)) + (lab,)

    pipe = ibot_pipeline()
    pipe.build()
    return pipe


class DaliData:
    """The loader interface of ``fastibot.data.loaders`` over a DALI pipeline."""

    def __init__(self, cfg, rank: int, world: int, device: torch.device):
        if cfg.data.source != "imagefolder":
            raise DataError("data.loader=dali reads image files: set data.source=imagefolder and data.path")
        samples, self.classes = list_images(cfg.data.path)
        t0 = time.perf_counter()
        samples, bad = screen_files(samples)
        log.info("DALI loader: screened %d files in %.1f s", len(samples) + len(bad), time.perf_counter() - t0)
        if bad:
            log.warning("DALI loader: %d unreadable file(s) left out, e.g. %s", len(bad), ", ".join(bad[:3]))
            if len(bad) > cfg.data.max_bad_fraction * (len(samples) + len(bad)):
                raise DataError(f"{len(bad)} of {len(samples) + len(bad)} files under data.path are unreadable "
                                f"(more than data.max_bad_fraction={cfg.data.max_bad_fraction}), e.g. {bad[0]}")
        self.unreported_bad = len(bad)  # counted once, in the first batch
        if device.type == "cuda" and device.index is None:  # DALI needs the ordinal; "cuda" means the current one
            device = torch.device("cuda", torch.cuda.current_device())
        self.cfg, self.device, self.rank = cfg, device, rank
        self.batch = cfg.data.batch_size
        self.steps_per_epoch = len(samples) // (self.batch * world)
        if self.steps_per_epoch == 0:
            raise DataError(f"{len(samples)} images cannot fill one global batch of {self.batch * world}")
        threads = cfg.data.dali_threads  # few: more threads ran slower (benchmarks/RESULTS.md, seventh session)
        self.pipe = build_pipeline([p for p, _ in samples], [lab for _, lab in samples], cfg.crops, self.batch,
                                   rank, world, cfg.runtime.seed + rank,
                                   device.index if device.type == "cuda" else None, threads)
        c, m = cfg.crops, cfg.masking
        self.grid = mask_grid(cfg)
        self.n_outputs = c.n_global + c.n_local
        self.capacity = row_capacity(cfg)
        self.mask_gen = MaskGenerator(m.pred_ratio, m.pred_ratio_var, m.aspect_ratio, m.shape)
        # the ratio table lives on the device: no host-to-device copy per batch
        self.ratio_table = (torch.tensor(m.pred_ratio, dtype=torch.float32, device=device),
                            torch.tensor(m.pred_ratio_var, dtype=torch.float32, device=device))
        self.step = 0
        self.targets: List = []  # the captured step's input buffers, once deliver_into has named them
        log.info("DALI loader: %d images, %d threads, decoder=%s, masks on %s", len(samples), threads,
                 "mixed" if device.type == "cuda" else "cpu", device.type)

    def set_position(self, epoch: int, step: int) -> None:
        self.step = epoch * self.steps_per_epoch + step

    def _masks(self) -> torch.Tensor:
        c, m = self.cfg.crops, self.cfg.masking
        n = c.n_global * self.batch
        seed = self.cfg.runtime.seed * 1_000_003 + self.rank * 7_919 + self.step
        if self.device.type == "cuda" and m.shape == "block":
            from ..kernels.block_mask import block_masks, sample_ratios
            g = torch.Generator(device=self.device).manual_seed(seed)
            ratios = sample_ratios(n, *self.ratio_table, generator=g, device=self.device)
            return block_masks(ratios, *self.grid, seed, m.aspect_ratio).reshape(n, -1)
        return self.mask_gen.batch(n, *self.grid, random.Random(seed)).reshape(n, -1).to(self.device)

    def deliver_into(self, static) -> None:
        """From now on write the crops of the i-th micro-batch of each step straight into ``static[i]``'s
        tensors (the captured step's input buffers): its copy of them is then skipped. Stream order keeps
        it safe: the writes are queued on the current stream after the replay that read the last batch."""
        self.targets = list(static)

    def _stack(self, outs, into: Optional[torch.Tensor] = None) -> torch.Tensor:
        """DALI outputs (one per crop, B each) copied straight into one (n*B, ...) tensor, ``into`` or a
        new one: no extra cat."""
        from nvidia.dali.tensors import TensorListGPU

        first = outs[0].as_tensor()
        b = first.shape()[0]
        shape = [b * len(outs)] + list(first.shape()[1:])
        if into is not None and list(into.shape) != shape:
            raise ValueError(f"DALI crops of shape {shape} cannot go into a step buffer of {tuple(into.shape)}")
        x = into if into is not None else torch.empty(shape, dtype=torch.float32, device=self.device)
        for i, out in enumerate(outs):
            dst = x[i * b:(i + 1) * b]
            if isinstance(out, TensorListGPU):
                from nvidia.dali.plugin.pytorch import feed_ndarray
                feed_ndarray(out.as_tensor(), dst, cuda_stream=torch.cuda.current_stream(self.device))
            else:  # CPU operators: DALI reuses this buffer, so it is copied
                dst.copy_(torch.from_numpy(out.as_array()))
        return x

    def _take_bad(self) -> torch.Tensor:
        n, self.unreported_bad = self.unreported_bad, 0
        return torch.full((), float(n), device=self.device)  # a fill, no host-to-device copy

    def __iter__(self):
        c = self.cfg.crops
        start = self.step % self.steps_per_epoch
        for i in range(start, self.steps_per_epoch):
            # iteration starts at a step boundary: the n-th batch yielded is micro-batch n mod accum of a step
            dst = self.targets[(i - start) % len(self.targets)] if self.targets else None
            try:
                outs = self.pipe.run()
            except RuntimeError as e:
                raise DataError(f"DALI could not decode an image under data.path ({str(e).splitlines()[0][:200]}); "
                                "data.loader=torchvision skips such files") from e
            masks = self._masks()  # (G*B, N)
            if self.step // self.steps_per_epoch < self.cfg.masking.start_epoch:
                masks = torch.zeros_like(masks)
            self.step += 1
            # labels stay on the host: training never reads them (no copy per batch)
            yield make_batch(self._stack(outs[: c.n_global], dst.globals if dst is not None else None),
                             self._stack(outs[c.n_global:self.n_outputs], dst.locals if dst is not None else None)
                             if c.n_local else None,
                             masks, c.n_global, self.capacity, n_bad=self._take_bad(),
                             labels=torch.from_numpy(outs[-1].as_array().reshape(-1)).long())
