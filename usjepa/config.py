"""Trainer configuration: YAML with strict keys (a typo is an error naming the key), plus ``--set a.b=v``.

The defaults are the paper's (Table 5); ``configs/usjepa_vitb16.yaml`` spells them out and
``configs/tiny_cpu.yaml`` shrinks everything for tests and the demo. Stage 1 starts from MAE's own
optimiser and decoder (``STAGE1_DEFAULTS``), not from the SALT stage's values. ``masks`` is ``MaskConfig``'s own
section; ``data.loader`` is handed to the data layer as its config (``DataConfig``); ``model.predictor``,
``model.decoder`` and a dict ``model.arch`` are the models' configs.

``load_config`` is the one validator, run before any work: every key, nested sections included, must exist
(an unknown one is an error with a did-you-mean), have the field's type and lie in its range (``RANGES``).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration file or override that does not fit the schema."""


@dataclass
class ModelSection:
    arch: Any = "vit_base_patch16_224"  # student (stage 2) / encoder being pretrained (stage 1): name or dict
    teacher: str | None = None  # stage 2: URFM file, timm/safetensors file or our stage-1 checkpoint
    teacher_arch: Any = "vit_base_patch16_224"
    predictor: dict = field(default_factory=lambda: {"embed_dim": 384, "depth": 12, "num_heads": 12})
    decoder: dict = field(default_factory=lambda: {"embed_dim": 256, "depth": 2, "num_heads": 8, "mask_ratio": 0.75})
    target_norm: str = "none"  # stage 2: "none" (teacher's final-norm output) or "layernorm" (again, no affine)
    loss: str = "smooth_l1"  # stage 2: Eq. 5's Smooth L1, or "l1" (I-JEPA / V-JEPA)


@dataclass
class DataSection:
    root: str | None = None  # shard folder (manifest.json), or its fsspec URL (s3://, gs://, https://)
    batch_size: int = 128  # per device
    backend: str = "dali"  # "dali" or "torch" (the DataLoader + OpenCV baseline)
    loader: dict = field(default_factory=dict)  # the data layer's own config (augmentations, workers, ...)
    val_from_train: float = 0.0  # > 0: validate on this deterministic slice of the train split's groups instead
    cache_dir: str | None = None  # URL root: mirrored indexes + cached shards (None: ~/.cache/usjepa)
    cache_limit_gb: float = 50.0  # URL root: at most this many GB of whole shards in cache_dir (LRU)


@dataclass
class OptimSection:
    epochs: int = 100
    schedule_epochs: float | None = None  # where the lr / wd cosines end (null: epochs); N steps: N / steps per epoch
    warmup_epochs: float = 10
    lr_start: float = 5.0e-6
    lr_peak: float = 5.0e-5
    lr_final: float = 5.0e-7
    wd_start: float = 0.04
    wd_final: float = 0.4
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1.0e-8
    clip_grad: float | None = 1.0  # max global grad norm; null = no clipping
    lr_scale: str = "none"  # "linear": lr_* x global batch / 256 (MAE / Goyal et al.); "none": lr_* as written


@dataclass
class TrainSection:
    bf16: bool = True  # autocast to bfloat16 on GPU (ignored on CPU, where float32 is exact and reproducible)
    compile: bool | None = None  # torch.compile student + predictor (and teacher); null = on CUDA, off on CPU
    log_every: int = 20  # steps per metrics line
    ckpt_every_steps: int = 1000  # 0 = only at epoch ends
    keep_last: int = 3  # step/epoch checkpoints kept (best.pt is kept apart)
    max_steps: int | None = None  # stop after this global step (smoke runs); the schedules still span all epochs
    val_every_epochs: int = 1
    tensorboard: bool = True  # when the tensorboard package is installed
    progress: bool = True  # tqdm bar on rank 0
    peak_flops: float | None = None  # per device, for MFU; null = known GPU table or measured CPU matmul rate
    threads: int | None = None  # torch CPU threads per process (null = torch's default)
    collective_timeout_s: float = 300.0  # torchrun: a rank waiting this long on the others stops (not NCCL's 10 min)
    # stage 2 on CUDA: data.batch_size = the largest multiple of 8 whose step fits this fraction of the GPU's
    # memory, measured at start (usjepa.step.batch_size_from_memory); a resumed run keeps its batch
    batch_from_memory: float | None = None


@dataclass
class Config:
    stage: int = 2  # 1 = masked pixel reconstruction (teacher), 2 = SALT (student)
    seed: int = 0
    out_dir: str = "runs/usjepa"
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    masks: dict = field(default_factory=dict)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Check / convert a YAML value to the field's type (YAML reads ``5e-6`` as a string, for one)."""
    hint = annotation
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        hint = next(a for a in args if a is not type(None))
    if hint is Any:
        return value
    if typing.get_origin(hint) is tuple:  # a pair such as crop_scale: [0.6, 1.0]
        args = typing.get_args(hint)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{where}: expected a list of {len(args)} numbers, got {value!r}")
        return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    try:
        if hint is bool:
            if not isinstance(value, bool):
                raise TypeError
            return value
        if hint is int:
            if isinstance(value, bool) or float(value) != int(float(value)):
                raise TypeError
            return int(float(value))
        if hint is float:
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        if hint is str:
            if not isinstance(value, str):
                raise TypeError
            return value
        if hint in (dict, list):
            if not isinstance(value, hint):
                raise TypeError
            return value
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: expected {getattr(hint, '__name__', hint)}, got {value!r}") from None
    return value


def check_keys(data: dict, known, where: str) -> None:
    """Every key of ``data`` must be one of ``known``; an unknown one is an error with a did-you-mean."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {data!r}")
    known = sorted(known)
    for k in data:
        if k not in known:
            key = f"{where}.{k}" if where else str(k)
            close = difflib.get_close_matches(str(k), known, n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"unknown config key {key!r}{hint}; known under {where or 'the top level'}: {known}")


def check_fields(cls, data: dict, where: str) -> dict:
    """``data`` checked against dataclass ``cls`` (keys, types of the fields), returned with coerced values."""
    check_keys(data, [f.name for f in dataclasses.fields(cls)], where)
    hints = typing.get_type_hints(cls)
    return {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in data.items()}


def from_dict(cls, data: dict, where: str = ""):
    """Build dataclass ``cls`` from ``data``; unknown keys and wrong types are errors naming the key."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    check_keys(data, [f.name for f in dataclasses.fields(cls)], where)
    kwargs = {}
    for name, value in data.items():
        key = f"{where}.{name}" if where else name
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = from_dict(hint, value or {}, key)
        else:
            kwargs[name] = _coerce(value, hint, key)
    return cls(**kwargs)


def apply_override(data: dict, assignment: str) -> None:
    """``"optim.epochs=3"`` -> data["optim"]["epochs"] = 3 (the value is parsed as YAML)."""
    if "=" not in assignment:
        raise ConfigError(f"override {assignment!r} is not KEY=VALUE")
    key, raw = assignment.split("=", 1)
    parts = key.strip().split(".")
    node = data
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {assignment!r}: {p} is not a section")
    try:
        node[parts[-1]] = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"override {assignment!r}: the value is not valid YAML ({_yaml_problem(e)})") from None


def _yaml_problem(e: yaml.YAMLError) -> str:
    mark = getattr(e, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{getattr(e, 'problem', None) or type(e).__name__}{where}"


# Stage 1 is MAE (He et al. 2022, ViT-B): base lr 1.5e-4 per 256 images scaled linearly with the global
# batch, AdamW betas (0.9, 0.95), weight decay 0.05 held constant, cosine to 0, an 8 x 512 decoder. These
# fill the keys a stage-1 config leaves out (keys it gives win); SALT's 5e-5 would starve the MAE.
STAGE1_DEFAULTS = {
    "optim": {"lr_start": 0.0, "lr_peak": 1.5e-4, "lr_final": 0.0, "wd_start": 0.05, "wd_final": 0.05,
              "betas": [0.9, 0.95], "lr_scale": "linear"},
    "model": {"decoder": {"embed_dim": 512, "depth": 8, "num_heads": 16, "mask_ratio": 0.75}},
}


def schedule_epochs(cfg: "Config") -> float:
    """Where the lr and wd schedules end, in epochs of progress: ``optim.schedule_epochs``, else the run's
    epochs. A run stopped by ``train.max_steps`` sets it to exactly its steps, so its cosine is not cut
    short where rounding the epochs up would leave it."""
    return cfg.optim.schedule_epochs if cfg.optim.schedule_epochs is not None else float(cfg.optim.epochs)


def lr_multiplier(cfg: "Config", world_size: int) -> float:
    """Factor on every lr_* value: global batch / 256 under ``optim.lr_scale: linear``, else 1."""
    return cfg.data.batch_size * world_size / 256 if cfg.optim.lr_scale == "linear" else 1.0


def _with_stage_defaults(data: dict) -> dict:
    if data.get("stage", Config.stage) != 1:
        return data
    out = dict(data)
    for section, defaults in STAGE1_DEFAULTS.items():
        given = out.get(section) or {}
        if isinstance(given, dict):
            out[section] = {**defaults, **given}
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | tuple = ()) -> Config:
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({_yaml_problem(e)})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
    for o in overrides:
        apply_override(data, o)
    cfg = from_dict(Config, _with_stage_defaults(data))
    validate(cfg)
    return cfg


# Allowed values (None, where a field allows it, is always fine). Keys of nested sections are checked against
# their own dataclasses (``_nested_schemas``); these are their ranges.
def _range(test, text):
    return test, text


_POSITIVE, _NON_NEGATIVE, _AT_LEAST_1 = _range(lambda v: v > 0, "> 0"), _range(lambda v: v >= 0, ">= 0"), \
    _range(lambda v: v >= 1, ">= 1")
_PROBABILITY, _FRACTION = _range(lambda v: 0 <= v <= 1, "in [0, 1]"), _range(lambda v: 0 < v <= 1, "in (0, 1]")
_OPEN_UNIT = _range(lambda v: 0 < v < 1, "in (0, 1)")
_MODEL_SIZES = {"embed_dim": _AT_LEAST_1, "depth": _AT_LEAST_1, "num_heads": _AT_LEAST_1, "mlp_ratio": _POSITIVE}
RANGES = {
    "seed": _NON_NEGATIVE,
    "data.batch_size": _AT_LEAST_1,
    "data.val_from_train": _range(lambda v: 0 <= v < 1, "in [0, 1)"),
    "data.cache_limit_gb": _NON_NEGATIVE,
    **{f"optim.{k}": r for k, r in {
        "epochs": _AT_LEAST_1, "schedule_epochs": _POSITIVE, "warmup_epochs": _NON_NEGATIVE,
        "lr_start": _NON_NEGATIVE, "lr_peak": _POSITIVE,
        "lr_final": _NON_NEGATIVE, "wd_start": _NON_NEGATIVE, "wd_final": _NON_NEGATIVE, "eps": _POSITIVE,
        "clip_grad": _POSITIVE, "betas": _range(lambda v: 0 <= v < 1, "in [0, 1)")}.items()},
    **{f"train.{k}": r for k, r in {
        "log_every": _AT_LEAST_1, "ckpt_every_steps": _NON_NEGATIVE, "keep_last": _AT_LEAST_1,
        "max_steps": _NON_NEGATIVE, "val_every_epochs": _AT_LEAST_1, "peak_flops": _POSITIVE, "threads": _AT_LEAST_1,
        "collective_timeout_s": _POSITIVE, "batch_from_memory": _FRACTION}.items()},
    **{f"model.{arch}.{k}": r for arch in ("arch", "teacher_arch") for k, r in {
        **_MODEL_SIZES, "img_size": _AT_LEAST_1, "patch_size": _AT_LEAST_1, "in_chans": _AT_LEAST_1,
        "num_classes": _NON_NEGATIVE}.items()},
    **{f"model.predictor.{k}": r for k, r in _MODEL_SIZES.items()},
    **{f"model.decoder.{k}": r for k, r in {**_MODEL_SIZES, "mask_ratio": _OPEN_UNIT}.items()},
    **{f"data.loader.{k}": r for k, r in {
        "image_size": _AT_LEAST_1, "patch_size": _AT_LEAST_1, "crop_scale": _FRACTION, "crop_ratio": _POSITIVE,
        "hflip_p": _PROBABILITY, "vflip_p": _PROBABILITY, "blur_p": _PROBABILITY, "speckle_p": _PROBABILITY,
        "contrast_p": _PROBABILITY, "blur_eps": _NON_NEGATIVE, "speckle_eps": _NON_NEGATIVE,
        "contrast_eps": _NON_NEGATIVE, "std": _POSITIVE, "cap": _AT_LEAST_1, "num_workers": _NON_NEGATIVE,
        "dali_threads": _AT_LEAST_1, "prefetch": _AT_LEAST_1, "mask_cache": _AT_LEAST_1}.items()},
}


def _check_ranges(values: dict, where: str) -> None:
    for k, v in values.items():
        key = f"{where}.{k}" if where else k
        rule = RANGES.get(key)
        if rule is None or v is None or isinstance(v, (dict, str, bool)):
            continue
        test, text = rule
        try:
            ok = all(test(x) for x in (v if isinstance(v, (list, tuple)) else [v]))
        except TypeError:
            ok = False
        if not ok:
            raise ConfigError(f"{key} must be {text}, got {v!r}")


def _nested_schemas() -> dict:
    """Dataclasses of the sections the trainer hands on: the models', the masks' and the data layer's own."""
    from usjepa.kernels.mask_config import MaskConfig
    from usjepa.models.mae import DecoderConfig
    from usjepa.models.salt import PredictorConfig
    from usjepa.shards.augment import DataConfig  # read only for its fields: the loader builds it

    return {"model.predictor": PredictorConfig, "model.decoder": DecoderConfig, "masks": MaskConfig,
            "data.loader": DataConfig}


def _check_arch(arch, where: str) -> None:
    from usjepa.models.vit import ARCHS, ViTConfig, vit_config

    if isinstance(arch, str):
        if arch not in ARCHS:
            close = difflib.get_close_matches(arch, sorted(ARCHS), n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{where}: unknown architecture {arch!r}{hint}; known: {sorted(ARCHS)}")
    elif isinstance(arch, dict):
        fields = dict(arch)
        if "name" in fields:
            _check_arch(fields.pop("name"), f"{where}.name")
        check_fields(ViTConfig, fields, where)
        _check_ranges(fields, where)
    else:
        raise ConfigError(f"{where}: expected an architecture name or a mapping of ViT fields, got {arch!r}")
    try:
        vit_config(arch)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {e}") from None


def validate(cfg: Config) -> None:
    """Ranges and cross-field rules of the whole config, nested sections included (see the module docstring)."""
    for section in ("", "data", "optim", "train"):
        node = cfg if not section else getattr(cfg, section)
        _check_ranges({f.name: getattr(node, f.name) for f in dataclasses.fields(node)}, section)
    if len(cfg.optim.betas) != 2:
        raise ConfigError(f"optim.betas must be two numbers, got {cfg.optim.betas!r}")
    schemas = _nested_schemas()
    built = {}
    for where, schema in schemas.items():
        section, _, name = where.partition(".")
        node = getattr(cfg, section)
        values = check_fields(schema, (getattr(node, name) if name else node) or {}, where)
        _check_ranges(values, where)
        try:
            built[where] = schema(**values)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{where}: {e}") from None
    _check_arch(cfg.model.arch, "model.arch")
    if cfg.model.teacher_arch is not None:
        _check_arch(cfg.model.teacher_arch, "model.teacher_arch")
    if built["masks"].grid != built["data.loader"].grid:
        raise ConfigError(f"masks.grid {built['masks'].grid} != data.loader image_size / patch_size = "
                          f"{built['data.loader'].grid}")
    if cfg.stage not in (1, 2):
        raise ConfigError(f"stage must be 1 (teacher pretraining) or 2 (SALT), got {cfg.stage}")
    if cfg.stage == 2 and not cfg.model.teacher:
        raise ConfigError("stage 2 needs model.teacher (a URFM, timm/safetensors or stage-1 checkpoint path)")
    if cfg.data.backend not in ("dali", "torch"):
        raise ConfigError(f"data.backend must be 'dali' or 'torch', got {cfg.data.backend!r}")
    horizon = schedule_epochs(cfg)
    if horizon > cfg.optim.epochs:
        raise ConfigError(f"optim.schedule_epochs {horizon} is past optim.epochs {cfg.optim.epochs}")
    if not 0 <= cfg.optim.warmup_epochs <= horizon:
        raise ConfigError("optim.warmup_epochs must lie in [0, optim.schedule_epochs or optim.epochs]")
    for key, value, allowed in (("model.target_norm", cfg.model.target_norm, ("none", "layernorm")),
                                ("model.loss", cfg.model.loss, ("smooth_l1", "l1")),
                                ("model.predictor.pos_embed", built["model.predictor"].pos_embed,
                                 ("learned", "sincos")),
                                ("optim.lr_scale", cfg.optim.lr_scale, ("none", "linear"))):
        if value not in allowed:
            raise ConfigError(f"{key} must be one of {list(allowed)}, got {value!r}")
