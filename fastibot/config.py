"""One typed configuration tree for fastibot.

The defaults are the published iBOT ViT-S/16 recipe. A run's configuration is
built from those defaults, then one YAML file, then dotted command-line
overrides (``optim.lr=1e-3``). Every key is checked: an unknown or misspelled
key, or a value of the wrong type or outside its allowed set, raises
:class:`ConfigError` naming the key. The resolved tree is saved in the run
folder (``config.yaml``) so a run can always be reproduced.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, List, Optional

import yaml


class ConfigError(ValueError):
    """A configuration key or value is not acceptable; the message names the key."""


_BOUNDS = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}


def _f(default, doc: str, choices: Optional[tuple] = None, **kw):
    """A dataclass field with a one-line doc, optional allowed values, and for numbers (or lists of numbers,
    item by item) optional bounds ``ge``/``gt``/``le``/``lt``."""
    meta = {"doc": doc}
    if choices is not None:
        meta["choices"] = choices
    bounds = {op: kw.pop(op) for op in _BOUNDS if op in kw}
    if bounds:
        meta["bounds"] = bounds
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


@dataclass
class ModelConfig:
    arch: str = _f("vit_small", "backbone", ("vit_tiny", "vit_small", "vit_base", "vit_large", "swin_tiny"))
    patch_size: int = _f(16, "patch size in pixels (4 for Swin)", ge=1)
    window_size: int = _f(7, "Swin attention window in tokens (7 or 14 in the paper); ViTs ignore it", ge=2)
    depth: int = _f(0, "ViT transformer blocks (0 = the arch's own: 12, or 24 for vit_large); a Swin keeps its "
                    "stage depths (0 only)", ge=0)
    drop_path: float = _f(0.1, "stochastic depth rate of the student (the teacher uses 0)", ge=0, lt=1)
    attention: str = _f("auto", "attention backend; varlen needs model.packed=true (the teacher's dense pass runs "
                        "SDPA); mixed = SDPA, with the memory-efficient kernel for sequences of at most 64 "
                        "tokens on CUDA; triton = fastibot's tile-attention kernels for sequences of at "
                        "most 256 tokens (both crop sizes; bf16/fp16 on CUDA), SDPA for longer ones; auto takes "
                        "the first that runs of a fixed order (triton, mixed on CUDA; sdpa on the CPU)",
                        ("auto", "xformers", "varlen", "triton", "mixed", "sdpa", "reference"))
    pos_embed_resize: str = _f("official", "position embeddings for other crop sizes: bicubic with scale factor "
                               "(n + 0.1) / grid as the official ViT (official), or resized to exactly n (exact)",
                               ("official", "exact"))
    packed: str = _f("auto", "one student pass over all crops (block-diagonal attention, heads on [CLS] and masked "
                            "tokens only; ViT only); false = the official dense computation (the parity oracle, "
                            "and what a Swin runs); auto = true for a ViT, false for a Swin", ("auto", "true", "false"))
    out_dim: int = _f(8192, "number of prototypes K of the [CLS] head", ge=1)
    patch_out_dim: int = _f(8192, "number of prototypes of the patch head", ge=1)
    shared_head: bool = _f(True, "student: one last layer for [CLS] and patch tokens")
    shared_head_teacher: bool = _f(True, "teacher: one last layer for [CLS] and patch tokens")
    norm_last_layer: bool = _f(False, "fix the weight-norm gain of the last head layer to 1")
    head_hidden_dim: int = _f(2048, "hidden width of the head MLP", ge=1)
    head_bottleneck_dim: int = _f(256, "l2-normalised bottleneck width of the head", ge=1)
    head_layers: int = _f(3, "layers of the head MLP", ge=1)


    def packed_forward(self) -> bool:
        """``packed`` resolved: auto is the packed forward for a ViT, the dense one for a Swin."""
        return self.packed == "true" or (self.packed == "auto" and not self.arch.startswith("swin"))


@dataclass
class IbotConfig:
    lambda1: float = _f(1.0, "weight of the [CLS] distillation loss", ge=0)
    lambda2: float = _f(1.0, "weight of the masked-patch (MIM) loss", ge=0)
    student_temp: float = _f(0.1, "student softmax temperature", gt=0)
    center_momentum: float = _f(0.9, "EMA momentum of the [CLS] center", ge=0, le=1)
    center_momentum2: float = _f(0.9, "EMA momentum of the patch center", ge=0, le=1)
    patch_center: str = _f("all", "patch center over all teacher patch logits (official) or masked ones only",
                           ("all", "masked"))


@dataclass
class TeacherConfig:
    momentum: float = _f(0.996, "EMA momentum at the start (cosine schedule)", ge=0, le=1)
    momentum_end: float = _f(1.0, "EMA momentum at the end", ge=0, le=1)
    temp: float = _f(0.07, "[CLS] teacher temperature after warm-up", gt=0)
    warmup_temp: float = _f(0.04, "[CLS] teacher temperature at step 0", gt=0)
    patch_temp: float = _f(0.07, "patch teacher temperature after warm-up", gt=0)
    warmup_patch_temp: float = _f(0.04, "patch teacher temperature at step 0", gt=0)
    warmup_temp_epochs: float = _f(30.0, "epochs of linear teacher-temperature warm-up", ge=0)
    temp_warmup: str = _f("epoch", "teacher-temperature warm-up steps once per epoch (official) or rises every "
                          "iteration", ("epoch", "iteration"))


@dataclass
class OptimConfig:
    epochs: int = _f(800, "training epochs (schedules span them)", ge=1)
    lr: float = _f(5e-4, "peak learning rate per 256 images (scaled linearly with the global batch)", gt=0)
    min_lr: float = _f(1e-6, "learning rate at the end of the cosine", ge=0)
    warmup_epochs: float = _f(10.0, "epochs of linear learning-rate warm-up", ge=0)
    weight_decay: float = _f(0.04, "weight decay at the start (cosine schedule)", ge=0)
    weight_decay_end: float = _f(0.4, "weight decay at the end", ge=0)
    betas: List[float] = _f([0.9, 0.999], "AdamW betas", ge=0, lt=1)
    clip_grad: float = _f(3.0, "gradient clipping threshold (0 disables)", ge=0)
    clip_mode: str = _f("per_param", "clip each parameter's gradient norm (official) or the global norm",
                        ("per_param", "global"))
    freeze_last_layer: float = _f(1.0, "epochs during which the last head layer gets no update", ge=0)
    accum_steps: int = _f(1, "micro-batches accumulated per optimizer step", ge=1)


@dataclass
class CropsConfig:
    global_size: int = _f(224, "global crop size in pixels", ge=1)
    local_size: int = _f(96, "local crop size in pixels", ge=1)
    n_global: int = _f(2, "number of global crops (the teacher sees these)", ge=1)
    n_local: int = _f(10, "number of local crops", ge=0)
    global_scale: List[float] = _f([0.25, 1.0], "RandomResizedCrop area range of global crops", gt=0, le=1)
    local_scale: List[float] = _f([0.05, 0.25], "RandomResizedCrop area range of local crops", gt=0, le=1)


@dataclass
class MaskingConfig:
    shape: str = _f("block", "mask shape: BEiT-style blocks or uniformly random patches", ("block", "rand"))
    pred_ratio: List[float] = _f([0.0, 0.3], "mean masked ratios; each crop picks one of them", ge=0, le=1)
    pred_ratio_var: List[float] = _f([0.0, 0.2], "half-width of the uniform range around each ratio", ge=0, le=1)
    aspect_ratio: List[float] = _f([0.3, 1 / 0.3], "aspect ratio range of mask blocks", gt=0)
    start_epoch: int = _f(0, "no masking before this epoch", ge=0)


@dataclass
class DataConfig:
    source: str = _f("synthetic", "images from a folder tree or procedurally generated", ("imagefolder", "synthetic"))
    loader: str = _f("auto", "torchvision (CPU reference), dali (GPU decode and augmentation), synthetic "
                     "(random device-resident crops, for timing the step) or auto (dali if installed on a GPU)",
                     ("auto", "torchvision", "dali", "synthetic"))
    path: str = _f("", "image folder (class subfolders, or a flat folder of images)")
    batch_size: int = _f(64, "images per step per process", ge=1)
    num_workers: int = _f(8, "worker processes of the torchvision loader", ge=0)
    dali_threads: int = _f(3, "CPU threads of the DALI pipeline (data.loader=dali); a few are fastest, more contend "
                              "with the training process for the cores", ge=1)
    synthetic_size: int = _f(2048, "number of images of the synthetic set", ge=1)
    synthetic_classes: int = _f(10, "number of classes of the synthetic set", ge=1)
    synthetic_resolution: int = _f(128, "side of the synthetic images in pixels", ge=1)
    max_bad_fraction: float = _f(0.5, "stop when more than this fraction of images fail to load", ge=0, le=1)


@dataclass
class KernelsConfig:
    loss: str = _f("auto", "iBOT loss: triton (fused kernels), reference (eager, official), auto (triton on CUDA, "
                   "reference elsewhere)", ("reference", "triton", "auto"))
    ema: str = _f("auto", "teacher EMA: triton (one fused launch), foreach, reference (the official per-tensor loop), "
                  "auto (triton on CUDA, foreach elsewhere)", ("reference", "foreach", "triton", "auto"))
    update: str = _f("auto", "the update after the gradients: triton (clipping, weight decay, AdamW and the teacher "
                     "EMA in one pass over flat buffers; needs the triton EMA), torch (foreach clipping and decay, "
                     "PyTorch's fused AdamW, then kernels.ema), auto (triton where the EMA is triton, else torch)",
                     ("torch", "triton", "auto"))


@dataclass
class RuntimeConfig:
    device: str = _f("auto", "cuda, cpu or auto", ("auto", "cuda", "cpu"))
    precision: str = _f("auto", "autocast dtype; auto = bf16 on CUDA, fp32 on CPU; fp16 adds loss scaling",
                        ("auto", "bf16", "fp16", "fp32"))
    output_dir: str = _f("runs/ibot", "run folder: config, checkpoints, metrics")
    seed: int = _f(0, "base random seed (rank r uses seed + r)", ge=0, lt=2 ** 32)
    max_steps: int = _f(0, "stop after this many optimizer steps (0 = run all epochs)", ge=0)
    max_minutes: float = _f(0.0, "stop (with a checkpoint) after this many minutes of training, checked at log "
                                 "steps (0 = no limit)", ge=0)
    log_every: int = _f(10, "read metrics from the device every N steps", ge=1)
    ckpt_every: int = _f(1000, "write a checkpoint every N steps (0 = only at the end)", ge=0)
    keep_last: int = _f(3, "checkpoints kept in the run folder", ge=1)
    max_nonfinite: int = _f(20, "stop after this many non-finite losses in a row", ge=1)
    tensorboard: bool = _f(True, "write scalars for TensorBoard")
    progress: bool = _f(True, "show a progress bar")
    compile: str = _f("auto", "torch.compile the teacher forward and the student forward + loss, each as one graph "
                      "(auto = on CUDA)", ("auto", "true", "false"))
    autotune: str = _f("none", "runtime.compile: how hard inductor searches for fast kernels while compiling: none "
                       "(its defaults), kernels (benchmarks block sizes of the Triton kernels it generates: "
                       "LayerNorm, GELU, casts), max (also GEMM templates against cuBLAS, with activations fused "
                       "into their epilogues); more search, longer first step", ("none", "kernels", "max"))
    cuda_graph: str = _f("auto", "capture the whole step once as a CUDA graph and replay it (auto = on CUDA)",
                         ("auto", "true", "false"))
    parallel: str = _f("ddp", "how processes split the work: ddp (each holds the whole model; one all-reduce of a "
                       "flat gradient buffer per step), fsdp (FSDP2: parameters, gradients, optimizer state and "
                       "teacher sharded over all processes), hsdp (sharded inside a group of runtime.shard_size "
                       "processes, replicated across groups)", ("ddp", "fsdp", "hsdp"))
    fsdp_reduce_dtype: str = _f("fp32", "fsdp/hsdp: dtype of the gradient reduce-scatter (fp32, or bf16 for half the "
                                "traffic)", ("fp32", "bf16"))
    shard_size: int = _f(0, "hsdp: processes per shard group (0 = the processes per node, torchrun's "
                            "LOCAL_WORLD_SIZE); the world size must be a multiple of it", ge=0)
    activation_memory: float = _f(0.7, "share of the student's activations kept for backward, (0, 1]: lower "
                                       "recomputes more (compiled: the partitioner's budget, whose memory and speed "
                                       "do not move smoothly with it; eager: that share of blocks keep theirs, the "
                                       "rest recompute). 0.7: ViT-S/16 at 0.38x the official step's memory (the "
                                       "ViT-B recipe file sets 0.6: 0.43x); 1: keep everything, 2-5 GiB more "
                                       "for 2.5-3.5% more img/s",
                                  gt=0, le=1)
    recompute_blocks: float = _f(0.0, "share of the student's blocks that recompute their activations in the backward "
                                      "(activation checkpointing, compiled or eager), on top of "
                                      "runtime.activation_memory: the leanest memory (1: every block) for one more "
                                      "forward of those blocks", ge=0, le=1)


@dataclass
class EvalConfig:
    every_n_steps: int = _f(0, "run k-NN every N steps during training (0 = never)", ge=0)
    train_path: str = _f("", "labelled image folder for the k-NN memory bank")
    val_path: str = _f("", "labelled image folder for the k-NN queries")
    k: int = _f(20, "neighbours of the weighted k-NN", ge=1)
    temperature: float = _f(0.07, "temperature of the weighted k-NN vote", gt=0)
    image_size: int = _f(224, "evaluation image size (resize to 8/7 of it, then center crop)", ge=1)
    batch_size: int = _f(128, "evaluation batch size", ge=1)
    max_images: int = _f(0, "use at most this many images per split (0 = all)", ge=0)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    ibot: IbotConfig = field(default_factory=IbotConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    crops: CropsConfig = field(default_factory=CropsConfig)
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    kernels: KernelsConfig = field(default_factory=KernelsConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


# --------------------------------------------------------------------------- checking


def _coerce(key: str, value: Any, typ, choices) -> Any:
    """Check ``value`` against the annotated type and return it in canonical form."""
    origin = typing.get_origin(typ)
    if origin in (list, List):
        (item,) = typing.get_args(typ)
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(f"{key}[{i}]", v, item, None) for i, v in enumerate(value)]
    if typ is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if typ is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            return float(value)
        except OverflowError:
            raise ConfigError(f"{key}: {value!r} is too large") from None
    if typ is str:
        if value is None:
            value = ""
        if isinstance(value, bool) and choices is not None and "true" in choices:
            value = "true" if value else "false"  # auto|true|false switches written as YAML booleans
        if not isinstance(value, str):
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise ConfigError(f"{key}: expected a string, got {value!r}")
            try:
                value = str(value)
            except ValueError:  # an integer beyond Python's digit limit
                raise ConfigError(f"{key}: expected a string, got a number of that many digits") from None
        if choices is not None and value not in choices:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(choices)}")
        return value
    raise ConfigError(f"{key}: unsupported type {typ}")


def _unknown(key: str, options) -> ConfigError:
    name = str(key).rsplit(".", 1)[-1]
    close = difflib.get_close_matches(name, list(options), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(f"{key}: unknown key{hint}")


def _apply(node, values: dict, prefix: str) -> None:
    hints = typing.get_type_hints(type(node))
    fields = {f.name: f for f in dataclasses.fields(node)}
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {values!r}")
    for name, value in values.items():
        key = f"{prefix}{name}"
        if not isinstance(name, str) or name not in fields:
            raise _unknown(key, fields)
        current = getattr(node, name)
        if dataclasses.is_dataclass(current):
            _apply(current, value, key + ".")
        else:
            setattr(node, name, _coerce(key, value, hints[name], fields[name].metadata.get("choices")))


def _set_dotted(cfg: Config, key: str, raw: str) -> None:
    parts = key.split(".")
    node = cfg
    for i, part in enumerate(parts[:-1]):
        fields = {f.name for f in dataclasses.fields(node)}
        if part not in fields or not dataclasses.is_dataclass(getattr(node, part)):
            raise _unknown(".".join(parts[: i + 1]), fields)
        node = getattr(node, part)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"{key}: cannot parse value {raw!r}: {e}") from None
    _apply(node, {parts[-1]: value}, ".".join(parts[:-1]) + "." if len(parts) > 1 else "")


def _bounds_text(bounds: dict) -> str:
    return " and ".join(f"{_BOUNDS[op]} {v if isinstance(v, int) else format(v, 'g')}" for op, v in bounds.items())


def leaves(node=None, prefix: str = ""):
    """(dotted key, dataclass field, value, annotated type) of every leaf of a config tree, in order."""
    node = node if node is not None else Config()
    hints = typing.get_type_hints(type(node))
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        if dataclasses.is_dataclass(value):
            yield from leaves(value, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", f, value, hints[f.name]


def _check_bounds(node) -> None:
    """Every number is finite and within its field's bounds (each item of a list of numbers)."""
    for key, f, value, _ in leaves(node):
        items = value if isinstance(value, list) else [value]
        for i, v in enumerate(items):
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            name = f"{key}[{i}]" if isinstance(value, list) else key
            if isinstance(v, float) and not math.isfinite(v):
                raise ConfigError(f"{name}: must be a finite number, got {v!r}")
            bounds = f.metadata.get("bounds", {})
            ok = all({"ge": v >= b, "gt": v > b, "le": v <= b, "lt": v < b}[op] for op, b in bounds.items())
            if not ok:
                raise ConfigError(f"{name}: must be {_bounds_text(bounds)}, got {v!r}")


def validate(cfg: Config) -> Config:
    """Every number within its field's bounds, then the checks that join several keys."""
    def need(cond, key, msg):
        if not cond:
            raise ConfigError(f"{key}: {msg}")

    _check_bounds(cfg)
    m, o, c, k = cfg.masking, cfg.optim, cfg.crops, cfg.data
    need(len(m.pred_ratio) >= 1, "masking.pred_ratio", "need at least one ratio")
    need(len(m.pred_ratio) == len(m.pred_ratio_var), "masking.pred_ratio_var",
         "must have as many entries as masking.pred_ratio")
    for i, (r, v) in enumerate(zip(m.pred_ratio, m.pred_ratio_var)):
        need(0 <= v <= r <= 1, f"masking.pred_ratio[{i}]", f"need 0 <= var ({v}) <= ratio ({r}) <= 1")
        need(r + v <= 1, f"masking.pred_ratio_var[{i}]", "ratio + var must not exceed 1")
    need(len(m.aspect_ratio) == 2 and 0 < m.aspect_ratio[0] <= m.aspect_ratio[1], "masking.aspect_ratio",
         "need two positive numbers, low <= high")
    for key in ("global_scale", "local_scale"):
        s = getattr(c, key)
        need(len(s) == 2 and 0 < s[0] <= s[1] <= 1, f"crops.{key}", "need two numbers 0 < low <= high <= 1")
    need(c.n_global + c.n_local >= 2, "crops.n_local",
         "need at least two crops in all (crops.n_global + crops.n_local)")
    p = cfg.model.patch_size
    need(c.global_size % p == 0, "crops.global_size", f"must be a multiple of model.patch_size ({p})")
    if cfg.model.arch.startswith("swin"):
        _validate_swin(cfg, need)
    need(c.local_size % p == 0, "crops.local_size", f"must be a multiple of model.patch_size ({p})")
    need(len(o.betas) == 2, "optim.betas", "need two numbers in [0, 1)")
    need(k.source != "imagefolder" or k.path or k.loader == "synthetic", "data.path",
         "required when data.source is imagefolder")
    need(k.source != "synthetic" or not k.path, "data.path",
         f"is set ({k.path!r}) but data.source is synthetic, so it would not be read: add data.source=imagefolder "
         "to train on those images, or leave data.path empty")
    if cfg.eval.every_n_steps:
        need(bool(cfg.eval.train_path), "eval.train_path", "required when eval.every_n_steps > 0")
        need(bool(cfg.eval.val_path), "eval.val_path", "required when eval.every_n_steps > 0")
        need(cfg.eval.image_size % p == 0, "eval.image_size", f"must be a multiple of model.patch_size ({p})")
    need(cfg.teacher.temp_warmup != "epoch" or float(cfg.teacher.warmup_temp_epochs).is_integer(),
         "teacher.warmup_temp_epochs", "must be a whole number of epochs with teacher.temp_warmup=epoch "
         "(or set teacher.temp_warmup=iteration)")
    need(cfg.model.attention != "varlen" or cfg.model.packed_forward(), "model.attention",
         "varlen attention runs on packed sequences only, and with model.packed=false every attention call is "
         "dense (it would run SDPA): set model.packed=true, or model.attention=sdpa|auto")
    _validate_parallel(cfg, need)
    need(cfg.kernels.update != "triton" or cfg.kernels.ema in ("triton", "auto"), "kernels.update",
         f"triton runs the teacher EMA inside its pass over the flat buffers of the triton EMA; with kernels.ema="
         f"{cfg.kernels.ema} set kernels.update=torch or auto")
    if cfg.model.shared_head or cfg.model.shared_head_teacher:
        need(cfg.model.out_dim == cfg.model.patch_out_dim, "model.patch_out_dim",
             "must equal model.out_dim when a head is shared")
    return cfg


def _validate_parallel(cfg: Config, need) -> None:
    r = cfg.runtime
    sharded = r.parallel != "ddp"
    need(not sharded or r.cuda_graph != "true", "runtime.cuda_graph",
         f"true cannot run with runtime.parallel={r.parallel}: FSDP2 gathers and frees each unit's parameters from "
         "Python hooks on its own streams, which a captured CUDA graph cannot replay; set runtime.cuda_graph=auto "
         "(off under fsdp/hsdp) or runtime.parallel=ddp")
    need(not sharded or cfg.kernels.ema != "triton", "kernels.ema",
         f"triton moves parameters into flat buffers, but under runtime.parallel={r.parallel} FSDP2 owns the "
         "storage of each shard; set kernels.ema=foreach or auto (the EMA then runs on each rank's local shards)")
    need(not sharded or cfg.kernels.update != "triton", "kernels.update",
         f"triton updates flat parameter buffers, but under runtime.parallel={r.parallel} FSDP2 owns the storage of "
         "each shard; set kernels.update=torch or auto")
    need(r.parallel == "hsdp" or r.shard_size == 0, "runtime.shard_size",
         f"is read only with runtime.parallel=hsdp (this run uses {r.parallel})")
    need(sharded or r.fsdp_reduce_dtype == "fp32", "runtime.fsdp_reduce_dtype",
         "is read only with runtime.parallel=fsdp|hsdp (ddp all-reduces fp32 gradients)")


def _validate_swin(cfg: Config, need) -> None:
    m = cfg.model
    need(m.packed != "true", "model.packed", "the packed forward is ViT-only (variable-length token sequences under "
         "block-diagonal global attention); a Swin attends within windows of a 2-D map: set model.packed=false")
    need(m.attention in ("auto", "sdpa", "reference"), "model.attention",
         f"{m.attention} serves the packed ViT path; Swin window attention runs on sdpa or reference")
    need(m.window_size >= 2, "model.window_size", "must be >= 2")
    need(m.pos_embed_resize == "official", "model.pos_embed_resize", f"resizes a ViT's absolute position "
         f"embeddings; {m.arch} has none (its attention uses relative position biases): leave it at official")
    need(m.depth == 0, "model.depth", f"sets a ViT's number of blocks; {m.arch} has its own stage depths, which "
         "model.depth does not change: leave model.depth=0")
    cell = m.patch_size * 8
    need(cfg.crops.global_size % cell == 0, "crops.global_size",
         f"must be a multiple of model.patch_size * 8 = {cell} for a Swin (masks are drawn on its final-stage grid, "
         "one cell per patch_size * 8 pixels)")


def packaged_config(name: str) -> Path:
    """Path of a YAML file shipped with fastibot (``quickstart``, ``vit_small_16``, ...)."""
    p = resources.files("fastibot.configs") / f"{name}.yaml"
    if not p.is_file():
        raise ConfigError(f"no packaged config named {name!r}")
    return Path(str(p))


def load_config(path=None, overrides: Optional[List[str]] = None) -> Config:
    """Defaults <- YAML file <- dotted ``key=value`` overrides, then checked."""
    cfg = Config()
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            values = yaml.safe_load(p.read_text())
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {e}") from None
        if values is None:  # an empty or comment-only file would silently run the full default recipe
            raise ConfigError(f"config file {str(path)!r} is empty (or only comments): give at least one key, "
                              "or leave out -c to use the packaged quickstart")
        _apply(cfg, values, "")
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. optim.lr=1e-3")
        key, raw = item.split("=", 1)
        _set_dotted(cfg, key.strip(), raw.strip())
    return validate(cfg)


def describe(node=None) -> List[str]:
    """One line per key: name, default, doc (for ``fastibot train --help-config``)."""
    lines = []
    for key, f, v, _ in leaves(node):
        ch, bounds = f.metadata.get("choices"), f.metadata.get("bounds")
        extra = f" [{'|'.join(ch)}]" if ch else f" [{_bounds_text(bounds)}]" if bounds else ""
        lines.append(f"{key} = {v!r}{extra}  # {f.metadata.get('doc', '')}")
    return lines
