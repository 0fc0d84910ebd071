"""Dataset specifications from the command line or from a kohya dataset TOML (``--dataset_config``).

Both sources produce the same :class:`DatasetSpec` list, so a TOML written as kohya users write it yields exactly the
items the equivalent flags yield::

    [general]
    resolution = 512
    flip_aug = false
    [[datasets]]
    batch_size = 4
      [[datasets.subsets]]
      image_dir = "data/photos"
      caption_extension = ".txt"
      conditioning_data_dir = "data/conditions"
      num_repeats = 1

Values are looked up as kohya does: subset -> dataset -> ``[general]`` -> command-line flags -> defaults. ``[general]``
may hold dataset and subset keys, a ``[[datasets]]`` block may hold subset keys.

Our extension (ignored by kohya): instead of ``conditioning_data_dir`` a subset may name a generated condition,
``condition = "sr" | "inpaint" | "canny" | "gray" | "blur" | "jpeg"``, with options named after the condition
(``sr_scale = 4``, ``canny_low = 100``, ``canny_high = 200``, ``blur_...``, ``jpeg_...``, ``inpaint_...``) or given as
a table ``condition_args = { ... }``. Without either, the subset uses ``--task`` when that is a generated condition.

Several ``[[datasets]]`` (each with its own resolution, buckets and batch size) are supported; a batch never mixes
datasets. Relative paths are taken from the current directory (as kohya does), else from the TOML's folder.

Unknown keys, and kohya keys this trainer does not implement (``shuffle_caption``, ``color_aug``, ...), give a
:class:`~trainer.data.errors.DataWarning` naming them; they are not errors, so a kohya TOML loads unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import tomllib

from trainer.data.errors import DataError, warn

GENERATED_CONDITIONS = ("sr", "inpaint", "canny", "gray", "blur", "jpeg")

DATASET_KEYS = {"resolution", "batch_size", "enable_bucket", "min_bucket_reso", "max_bucket_reso",
                "bucket_reso_steps", "validation_split", "validation_seed"}
SUBSET_KEYS = {"image_dir", "conditioning_data_dir", "caption_extension", "num_repeats", "flip_aug", "random_crop",
               "condition", "condition_args", "default_caption"}
# kohya keys accepted without effect (a warning names them)
KOHYA_IGNORED = {"shuffle_caption", "keep_tokens", "keep_tokens_separator", "secondary_separator", "enable_wildcard",
                 "color_aug", "face_crop_aug_range", "caption_prefix", "caption_suffix", "caption_dropout_rate",
                 "caption_dropout_every_n_epochs", "caption_tag_dropout_rate", "token_warmup_min",
                 "token_warmup_step", "class_tokens", "is_reg", "metadata_file", "bucket_no_upscale", "cache_info",
                 "alpha_mask", "custom_attributes", "network_multiplier", "debug_dataset", "resize_interpolation",
                 "max_token_length"}
# a key ``<condition>_<name>`` is an option of that generated condition
CONDITION_PREFIXES = tuple(f"{c}_" for c in GENERATED_CONDITIONS)
# command-line flags that are condition options (None = not given = the builder's default)
CLI_CONDITION_FLAGS = ("sr_scale", "canny_low", "canny_high")

DEFAULTS = {"caption_extension": ".caption", "default_caption": "", "num_repeats": 1, "flip_aug": False,
            "random_crop": False, "batch_size": 1, "enable_bucket": False, "min_bucket_reso": None,
            "max_bucket_reso": None, "bucket_reso_steps": 64, "validation_split": 0.0, "validation_seed": None}


class DatasetConfigError(DataError):
    """A dataset TOML (or the flags that stand for one) that cannot be used."""


@dataclass(frozen=True)
class DataSettings:
    """What the data layer needs from the command line (flag names; see ``train.py --help``). A dataset TOML
    overrides the dataset and subset values; these are its fallbacks."""

    train_data_dir: str | None = None
    conditioning_data_dir: str | None = None
    dataset_config: str | None = None
    resolution: tuple[int, int] | None = None
    caption_extension: str = ".caption"
    default_caption: str = ""
    enable_bucket: bool = False
    flip_aug: bool = False
    dataset_repeats: int = 1
    task: str = "paired"
    random_crop: bool = False
    min_bucket_reso: int | None = None
    max_bucket_reso: int | None = None
    bucket_reso_steps: int = 64
    skip_missing: bool = False
    validation_split: float = 0.0
    validation_seed: int | None = None
    validation_data_dir: str | None = None
    validation_conditioning_data_dir: str | None = None
    sr_scale: int | None = None
    canny_low: int | None = None
    canny_high: int | None = None
    condition_args: tuple[str, ...] = ()
    train_batch_size: int = 1
    seed: int = 42
    cache_conditions: bool = False  # keep deterministic generated conditions in memory (with cached latents)


@dataclass
class SubsetSpec:
    image_dir: Path
    conditioning_data_dir: Path | None
    condition: str                       # "paired" or a generated condition
    condition_options: dict = field(default_factory=dict)
    caption_extension: str = ".caption"
    default_caption: str = ""
    num_repeats: int = 1
    flip_aug: bool = False
    random_crop: bool = False
    name: str = "--train_data_dir"       # where it came from, for messages


@dataclass
class DatasetSpec:
    resolution: tuple[int, int]
    batch_size: int
    subsets: list[SubsetSpec]
    enable_bucket: bool = False
    min_bucket_reso: int | None = None
    max_bucket_reso: int | None = None
    bucket_reso_steps: int = 64
    validation_split: float = 0.0
    validation_seed: int | None = None


def _warn(message: str) -> None:
    warn(message, stacklevel=3)


def _typed(kind, value, key: str, where: str):
    """``value`` as an int or float, or a :class:`DatasetConfigError` naming the key (``"two"``, ``2.5`` for an
    integer and ``true`` are all refused)."""
    if isinstance(value, bool) or (kind is int and not isinstance(value, int)) or \
            (kind is float and not isinstance(value, (int, float))):
        raise DatasetConfigError(f"{where}: {key} = {value!r} must be {'an integer' if kind is int else 'a number'}")
    return kind(value)


def _switch(value, key: str, where: str) -> bool:
    """A TOML switch must be true or false: the string "false" would otherwise switch it on."""
    if not isinstance(value, bool):
        raise DatasetConfigError(f"{where}: {key} = {value!r} must be true or false (without quotes)")
    return value


def parse_resolution(value, where: str) -> tuple[int, int]:
    try:
        if isinstance(value, (list, tuple)):
            parts = [int(v) for v in value]
        else:
            parts = [int(v) for v in str(value).replace("x", ",").split(",")]
    except (TypeError, ValueError):
        raise DatasetConfigError(f"{where}: resolution must be W or [W, H] in pixels, got {value!r}") from None
    if len(parts) not in (1, 2) or min(parts) < 64 or any(v % 8 for v in parts):
        raise DatasetConfigError(f"{where}: resolution must be W or [W, H], multiples of 8 and >= 64, got {value!r}")
    return parts[0], parts[-1]


def condition_options_from_settings(settings: DataSettings) -> dict:
    """Condition options given on the command line: ``--sr_scale``, ``--canny_low/high``, ``--condition_args K=V``."""
    options = {}
    for name in CLI_CONDITION_FLAGS:
        value = getattr(settings, name)
        if value is not None:
            options[name] = value
    for pair in settings.condition_args:
        key, eq, value = str(pair).partition("=")
        if not eq:
            raise DatasetConfigError(f"--condition_args expects KEY=VALUE, got {pair!r}")
        options[key.strip()] = _literal(value.strip())
    return options


def _literal(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def _condition_for(conditioning_data_dir, condition, task, where: str) -> str:
    if condition is not None:
        if conditioning_data_dir is not None:
            raise DatasetConfigError(f"{where}: give either conditioning_data_dir (your own condition images) or "
                                     f"condition = {condition!r} (generated), not both")
        if condition not in GENERATED_CONDITIONS:
            raise DatasetConfigError(f"{where}: condition = {condition!r} is not one of "
                                     f"{', '.join(GENERATED_CONDITIONS)} (use conditioning_data_dir for your own "
                                     f"condition images)")
        return condition
    if conditioning_data_dir is not None:
        return "paired"
    if task in GENERATED_CONDITIONS:
        return task
    raise DatasetConfigError(f"{where}: no condition: give the condition images (conditioning_data_dir / "
                             f"--conditioning_data_dir, same basenames) or a generated condition (--task "
                             f"{'|'.join(GENERATED_CONDITIONS)}, or condition = \"...\" in a dataset TOML)"
                             + (f"; --task {task} needs your own condition images" if task else ""))


def _filter_options(condition: str, options: dict, where: str) -> dict:
    """Keep the options that belong to ``condition``; warn about options of other conditions."""
    if condition == "paired":
        if options:
            _warn(f"{where}: condition options {', '.join(sorted(options))} are ignored for paired condition "
                  f"images (conditioning_data_dir)")
        return {}
    kept, other = {}, []
    for key, value in options.items():
        if key.startswith(CONDITION_PREFIXES) and not key.startswith(f"{condition}_"):
            other.append(key)
        else:
            kept[key] = value
    if other:
        _warn(f"{where}: options {', '.join(sorted(other))} do not apply to condition {condition!r} and are ignored")
    return kept


def _cli_fallbacks(settings: DataSettings, resolution) -> dict:
    """Dataset and subset values as the flags give them (a dataset TOML's fallbacks)."""
    return {"resolution": settings.resolution or resolution, "batch_size": settings.train_batch_size,
            "enable_bucket": bool(settings.enable_bucket), "min_bucket_reso": settings.min_bucket_reso,
            "max_bucket_reso": settings.max_bucket_reso, "bucket_reso_steps": settings.bucket_reso_steps or 64,
            "validation_split": settings.validation_split or 0.0, "validation_seed": settings.validation_seed,
            "caption_extension": settings.caption_extension, "default_caption": settings.default_caption or "",
            "num_repeats": settings.dataset_repeats, "flip_aug": bool(settings.flip_aug),
            "random_crop": bool(settings.random_crop)}


def specs_from_settings(settings: DataSettings, resolution) -> list[DatasetSpec]:
    """The one dataset the command-line flags describe."""
    if not settings.train_data_dir:
        raise DatasetConfigError("give the training images with --train_data_dir (or --dataset_config)")
    where = "--train_data_dir"
    condition = _condition_for(settings.conditioning_data_dir, None, settings.task, where)
    values = _cli_fallbacks(settings, resolution)
    subset = SubsetSpec(
        image_dir=Path(settings.train_data_dir),
        conditioning_data_dir=Path(settings.conditioning_data_dir) if settings.conditioning_data_dir else None,
        condition=condition,
        condition_options=_filter_options(condition, condition_options_from_settings(settings), where),
        caption_extension=values["caption_extension"], default_caption=values["default_caption"],
        num_repeats=values["num_repeats"], flip_aug=values["flip_aug"], random_crop=values["random_crop"],
        name=where)
    return [DatasetSpec(resolution=tuple(values["resolution"]), batch_size=values["batch_size"], subsets=[subset],
                        enable_bucket=values["enable_bucket"], min_bucket_reso=values["min_bucket_reso"],
                        max_bucket_reso=values["max_bucket_reso"], bucket_reso_steps=values["bucket_reso_steps"],
                        validation_split=values["validation_split"], validation_seed=values["validation_seed"])]


def _check_keys(table: dict, allowed: set, where: str) -> None:
    keys = [k for k in table if k != "subsets"]
    unknown = sorted(k for k in keys if k not in allowed and k not in KOHYA_IGNORED
                     and not k.startswith(CONDITION_PREFIXES))
    ignored = sorted(k for k in keys if k in KOHYA_IGNORED)
    if unknown:
        _warn(f"{where}: unknown keys {', '.join(unknown)} (ignored; check the spelling)")
    if ignored:
        _warn(f"{where}: kohya keys {', '.join(ignored)} are not used by this trainer (ignored)")


def _resolve_path(value, config_dir: Path) -> Path:
    path = Path(str(value)).expanduser()
    if path.is_absolute() or path.exists() or not (config_dir / path).exists():
        return path
    return config_dir / path


def load_dataset_config(path, settings: DataSettings, resolution) -> list[DatasetSpec]:
    """Read a kohya dataset TOML into dataset specs (see the module docstring for the rules)."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise DatasetConfigError(f"--dataset_config {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise DatasetConfigError(f"--dataset_config {path} is not valid TOML: {exc}") from None
    top_unknown = sorted(set(data) - {"general", "datasets"})
    if top_unknown:
        _warn(f"{path}: unknown top-level keys {', '.join(top_unknown)} (ignored; expected [general] and "
              f"[[datasets]])")
    general = data.get("general", {}) or {}
    if not isinstance(general, dict):
        raise DatasetConfigError(f"{path}: [general] must be a table")
    _check_keys(general, DATASET_KEYS | SUBSET_KEYS, f"{path} [general]")
    datasets = data.get("datasets") or []
    if not isinstance(datasets, list) or not datasets:
        raise DatasetConfigError(f"{path}: no [[datasets]] (each with [[datasets.subsets]] naming an image_dir)")
    fallback = _cli_fallbacks(settings, resolution)
    cli_options = condition_options_from_settings(settings)
    specs = []
    for d_number, dataset in enumerate(datasets, 1):
        d_where = f"{path} [[datasets]] #{d_number}"
        _check_keys(dataset, DATASET_KEYS | SUBSET_KEYS, d_where)

        def dataset_value(key, _dataset=dataset):
            for table in (_dataset, general):
                if key in table:
                    return table[key]
            return fallback.get(key, DEFAULTS.get(key))

        subsets = dataset.get("subsets") or []
        if not subsets:
            raise DatasetConfigError(f"{d_where}: no [[datasets.subsets]] (each names an image_dir)")
        subset_specs = []
        for s_number, subset in enumerate(subsets, 1):
            where = f"{d_where} subset #{s_number}"
            _check_keys(subset, SUBSET_KEYS, where)

            def value(key, _subset=subset, _dataset_value=dataset_value):
                return _subset[key] if key in _subset else _dataset_value(key)

            if "image_dir" not in subset:
                raise DatasetConfigError(f"{where}: image_dir is missing")
            cond_dir = subset.get("conditioning_data_dir")
            condition = _condition_for(cond_dir, value("condition"), settings.task, where)
            options = dict(cli_options)
            for table in (general, dataset, subset):  # later tables override
                options.update({k: v for k, v in table.items() if k.startswith(CONDITION_PREFIXES)})
                options.update(table.get("condition_args") or {})
            num_repeats = _typed(int, value("num_repeats"), "num_repeats", where)
            if num_repeats < 1:
                raise DatasetConfigError(f"{where}: num_repeats must be >= 1, got {num_repeats}")
            subset_specs.append(SubsetSpec(
                image_dir=_resolve_path(subset["image_dir"], path.parent),
                conditioning_data_dir=_resolve_path(cond_dir, path.parent) if cond_dir else None,
                condition=condition, condition_options=_filter_options(condition, options, where),
                caption_extension=str(value("caption_extension")), default_caption=str(value("default_caption")),
                num_repeats=num_repeats, flip_aug=_switch(value("flip_aug"), "flip_aug", where),
                random_crop=_switch(value("random_crop"), "random_crop", where),
                name=f"{where} ({subset['image_dir']})"))
        batch_size = _typed(int, dataset_value("batch_size"), "batch_size", d_where)
        if batch_size < 1:
            raise DatasetConfigError(f"{d_where}: batch_size must be >= 1, got {batch_size}")
        specs.append(DatasetSpec(
            resolution=parse_resolution(dataset_value("resolution"), d_where), batch_size=batch_size,
            subsets=subset_specs, enable_bucket=_switch(dataset_value("enable_bucket"), "enable_bucket", d_where),
            min_bucket_reso=dataset_value("min_bucket_reso"), max_bucket_reso=dataset_value("max_bucket_reso"),
            bucket_reso_steps=_typed(int, dataset_value("bucket_reso_steps") or 64, "bucket_reso_steps", d_where),
            validation_split=_typed(float, dataset_value("validation_split") or 0.0, "validation_split", d_where),
            validation_seed=dataset_value("validation_seed")))
    return specs
