"""Trainer flags: kohya sd-scripts names (diffusers names as aliases), a TOML ``--config_file`` and
``--output_config``. Imports nothing heavy, so ``train.py --help`` answers at once.

Precedence: built-in defaults < values from `--config_file` < flags given on the command line.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import sys
from pathlib import Path

import tomllib

from trainer.evaluation.options import parse_strengths

OPTIMIZERS = ("AdamW", "AdamW8bit", "PagedAdamW8bit", "Lion8bit", "Lion", "Adafactor")
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
LIST_FLAGS = ("optimizer_args", "condition_args")  # nargs="*" flags, lists in TOML
CHOICE_SWITCHES = ("shared_timestep", "ema_warmup")  # true|false choices, written as TOML booleans
# settings that may differ on --resume when named in --resume_changes: they change how the rest of the run
# proceeds, not what the saved weights and optimizer state mean
SAFE_RESUME_CHANGES = ("learning_rate", "lr_scheduler", "lr_warmup_steps", "max_grad_norm", "mixed_precision",
                       "ema_decay", "guidance_weight")
TASKS = ("sr", "inpaint", "canny", "depth", "gray", "blur", "jpeg", "paired")


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error: ``codi: error: <what is wrong and what to do>`` and exit 2 (argparse would
    print the whole usage block first)."""

    def error(self, message):
        sys.stderr.write(f"codi: error: {message} (`python trainer/train.py --help` lists every flag)\n")
        sys.exit(2)


def _bool_flag(group, name, help_text, **kw):
    group.add_argument(name, action="store_true", help=help_text, **kw)


def _configuration_flags(g) -> None:
    g.add_argument("--config_file", type=str, help="TOML file with any of these flags (flag names as keys)")
    g.add_argument("--output_config", nargs="?", const="", default=None, metavar="PATH",
                   help="write the effective configuration as TOML (to PATH, or <output_dir>/<output_name>.toml) "
                        "and exit without training")
    g.add_argument("--dry_run", action="store_true",
                   help="build models, adapter and optimizer, print parameter counts and the predicted memory, "
                        "run no step")


def _model_flags(g) -> None:
    g.add_argument("--pretrained_model_name_or_path", type=str,
                   help="base checkpoint: single file (.safetensors, or .ckpt loaded with weights_only) or a "
                        "diffusers folder")
    _bool_flag(g, "--v2", "the checkpoint is SD2.x (detected automatically; kept for kohya compatibility)")
    g.add_argument("--v_parameterization", action="store_true", default=None,
                   help="force v-prediction (SD2-768); by default detected from the checkpoint")
    g.add_argument("--vae", type=str, help="a separate VAE (single file or diffusers folder)")
    _bool_flag(g, "--no_half_vae", "keep the VAE in float32 under mixed precision (SDXL's VAE, whose config asks for "
                                    "it with force_upcast, always stays float32)")
    g.add_argument("--zero_terminal_snr", action="store_true", default=None,
                   help="the checkpoint uses the zero-terminal-SNR schedule (Lin et al.; v-prediction only); by "
                        "default detected from a `ztsnr` key or the scheduler config")
    g.add_argument("--clip_skip", type=int, default=None,
                   help="condition on the text encoder's layer -N (kohya; ComfyUI's CLIPSetLastLayer = -N); default: "
                        "the architecture's own (SD1: 1, SD2 and SDXL: 2)")
    g.add_argument("--tokenizer_path", type=str,
                   help="folder with the CLIP tokenizer (vocab.json, merges.txt) for single-file checkpoints")


def _data_flags(g) -> None:
    g.add_argument("--train_data_dir", type=str, help="folder of target images (+ captions)")
    g.add_argument("--conditioning_data_dir", type=str,
                   help="folder of condition images with the same basenames as the targets")
    g.add_argument("--dataset_config", type=str, help="kohya dataset TOML")
    g.add_argument("--resolution", type=str, default=None, help="training resolution: 512 or 512,768 (w,h)")
    g.add_argument("--caption_extension", type=str, default=".caption",
                   help="caption file extension (kohya default .caption; .txt is also read when .caption is absent)")
    g.add_argument("--default_caption", type=str, default="", help="caption for images without a caption file")
    _bool_flag(g, "--enable_bucket", "aspect-ratio buckets")
    _bool_flag(g, "--flip_aug", "random horizontal flips (target and condition flip together)")
    g.add_argument("--max_data_loader_n_workers", type=int, default=0)
    g.add_argument("--dataset_repeats", type=int, default=1)
    g.add_argument("--task", choices=TASKS, default="paired",
                   help="what the adapter learns (stored in metadata). Without --conditioning_data_dir, sr, inpaint, "
                        "canny, gray, blur and jpeg conditions are generated on the fly from the cropped target")
    _bool_flag(g, "--random_crop", "random instead of center crops (not with --cache_latents)")
    g.add_argument("--min_bucket_reso", type=int, default=None,
                   help="smallest bucket side (default: min(256, resolution))")
    g.add_argument("--max_bucket_reso", type=int, default=None,
                   help="largest bucket side (default: max(1024, resolution))")
    g.add_argument("--bucket_reso_steps", type=int, default=64, help="bucket sides are multiples of this")
    _bool_flag(g, "--skip_missing", "train without images that have no condition image (reported with their count) "
                                    "instead of stopping")
    g.add_argument("--validation_split", type=float, default=0.0,
                   help="hold out this fraction of the images (by image, chosen by --validation_seed) for validation")
    g.add_argument("--validation_seed", type=int, default=None, help="seed of the validation split (default --seed)")
    g.add_argument("--validation_data_dir", type=str, default=None, help="separate validation images")
    g.add_argument("--validation_conditioning_data_dir", type=str, default=None,
                   help="condition images of --validation_data_dir (paired conditions)")
    g.add_argument("--sr_scale", type=int, default=None, help="sr condition: downscale factor (2, 4, 8)")
    g.add_argument("--canny_low", type=int, default=None, help="canny condition: low threshold")
    g.add_argument("--canny_high", type=int, default=None, help="canny condition: high threshold")
    g.add_argument("--condition_args", nargs="*", default=[], metavar="KEY=VALUE",
                   help="more options of the generated condition, e.g. jpeg_quality=30")


def _memory_flags(g) -> None:
    _bool_flag(g, "--gradient_checkpointing", "recompute activations in the backward pass (adapter and base UNet)")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1)
    _bool_flag(g, "--cache_latents", "encode the images with the VAE once, before training")
    _bool_flag(g, "--cache_latents_to_disk", "like --cache_latents, stored beside the images (reused across runs)")
    _bool_flag(g, "--cache_text_encoder_outputs", "encode each caption once and free the text encoder(s)")
    _bool_flag(g, "--full_fp16", "refused: fp16 trainable weights lose small updates (use --mixed_precision fp16)")
    _bool_flag(g, "--full_bf16", "refused: bf16 trainable weights lose small updates (use --mixed_precision bf16)")
    _bool_flag(g, "--sdpa", "PyTorch scaled-dot-product attention (the default in diffusers)")
    _bool_flag(g, "--xformers", "xformers attention (if installed)")
    _bool_flag(g, "--lowram", "load the checkpoint straight to the GPU instead of RAM")


def _optimizer_flags(g) -> None:
    g.add_argument("--optimizer_type", choices=OPTIMIZERS, default="AdamW")
    g.add_argument("--optimizer_args", nargs="*", default=[], metavar="KEY=VALUE",
                   help='extra optimizer arguments, e.g. weight_decay=0.01 "betas=0.9,0.99"')
    _bool_flag(g, "--use_8bit_adam", "legacy alias of --optimizer_type AdamW8bit")
    g.add_argument("--learning_rate", type=float, default=1e-5)
    g.add_argument("--lr_scheduler", choices=LR_SCHEDULERS, default="constant_with_warmup")
    g.add_argument("--lr_warmup_steps", type=int, default=0)
    g.add_argument("--max_grad_norm", type=float, default=1.0, help="gradient-norm clip (0 disables)")


def _length_flags(g) -> None:
    g.add_argument("--max_train_steps", type=int, default=1600)
    g.add_argument("--max_train_epochs", type=int, default=None, help="overrides --max_train_steps")
    g.add_argument("--train_batch_size", type=int, default=1)
    g.add_argument("--seed", type=int, default=42)
    g.add_argument("--mixed_precision", choices=("no", "fp16", "bf16"), default="no")
    g.add_argument("--save_precision", choices=("float", "fp16", "bf16"), default="fp16",
                   help="dtype of the saved adapter")


def _saving_flags(g) -> None:
    g.add_argument("--output_dir", type=str, default="outputs")
    g.add_argument("--output_name", type=str, default="codi_adapter")
    g.add_argument("--save_model_as", choices=("safetensors",), default="safetensors")
    g.add_argument("--save_every_n_steps", type=int, default=None)
    g.add_argument("--save_last_n_steps", type=int, default=None,
                   help="keep only the intermediate saves of the last N steps")
    g.add_argument("--training_comment", type=str, default=None)
    _bool_flag(g, "--no_metadata", "write no ss_* provenance (modelspec.* and codi.* are always written)")
    g.add_argument("--controlnet_layout", choices=("ldm", "diffusers"), default="ldm",
                   help="key layout of a `controlnet` adapter file: ldm (ComfyUI/A1111/Forge read any size) or "
                        "diffusers (ControlNetModel)")


def _resume_flags(g) -> None:
    _bool_flag(g, "--save_state", "also save the full training state with every save (for --resume)")
    _bool_flag(g, "--save_state_on_train_end", "save the full training state at the end")
    g.add_argument("--resume", type=str, default=None,
                   help="a saved state folder to continue from; the settings that make the run what it is (task, "
                        "data, base, adapter, batch, optimizer, seed, ...) must match the state's")
    g.add_argument("--resume_changes", type=str, default="",
                   help="comma-separated settings that may differ from the state on --resume: learning_rate, "
                        "lr_scheduler, lr_warmup_steps, max_grad_norm, mixed_precision, ema_decay, guidance_weight")


def _sample_flags(g) -> None:
    g.add_argument("--sample_prompts", type=str,
                   help="prompt file: one prompt per line with --n negative, --w/--h size, --d seed, --s steps, "
                        "--l cfg, --cn condition image")
    g.add_argument("--sample_every_n_steps", type=int, default=None)
    _bool_flag(g, "--sample_at_first", "sample before the first step")
    g.add_argument("--sample_sampler", choices=("ode", "consistency"), default="ode")


def _quality_report_flags(g) -> None:
    _bool_flag(g, "--quality_report", "after training, score the adapter on the validation pairs (PSNR, SSIM, task "
                                      "metric at --quality_report_steps vs the trivial baseline): report.md, a "
                                      "quality-vs-steps plot and an image grid in <output_dir>/<output_name>-report")
    g.add_argument("--quality_report_steps", type=str, default="1,2,4")
    g.add_argument("--quality_reference_steps", type=int, default=None,
                   help="also sample the same adapter with plain DDIM at this many steps (e.g. 50)")
    g.add_argument("--quality_max_pairs", type=int, default=16, help="validation pairs scored at most")
    g.add_argument("--quality_hint_start", type=str, default=None,
                   help="sr: also start the largest report step count from the bicubic upsample at these "
                        "strengths (e.g. 0.5)")


def _logging_flags(g) -> None:
    g.add_argument("--log_with", choices=("tensorboard", "wandb", "all"), default=None)
    g.add_argument("--logging_dir", type=str, default=None)
    g.add_argument("--log_prefix", type=str, default=None)


def _adapter_flags(g) -> None:
    g.add_argument("--adapter_type", choices=("controlnet", "control-lora"), default=None,
                   help="controlnet (full encoder copy, the paper's PE-CoDi) or control-lora (LoRA on the frozen "
                        "encoder copy; default for SDXL)")
    g.add_argument("--network_dim", type=int, default=64, help="LoRA rank of a control-lora adapter")
    g.add_argument("--network_alpha", type=float, default=None, help="LoRA alpha (default: = network_dim)")
    g.add_argument("--unet_lora_dim", type=int, default=0, help="also train a UNet LoRA of this rank (0: off)")
    g.add_argument("--unet_lora_alpha", type=float, default=None)
    g.add_argument("--conditioning_embedding_channels", type=str, default="16,32,96,256",
                   help="hint CNN channels (ComfyUI requires 16,32,96,256)")


def _distillation_flags(g) -> None:
    g.add_argument("--loss", choices=("codi", "diffusion"), default="codi",
                   help="codi: conditional diffusion distillation (1-4 step sampling); diffusion: the plain denoising "
                        "loss of an ordinary ControlNet fine-tune (sample it with many steps; a baseline)")
    g.add_argument("--init_adapter", type=str, default=None,
                   help="start from the weights of this adapter .safetensors (same type and base) instead of the "
                        "zero-initialised adapter")
    g.add_argument("--teacher_adapter", type=str, default=None,
                   help="frozen adapter for --ode_model teacher (e.g. a ControlNet trained with --loss diffusion: "
                        "with --guidance_weight 0 this is LCM-style consistency distillation of it)")
    g.add_argument("--distill_grid", type=int, default=50, help="grid size N (timesteps t = i*1000//N)")
    g.add_argument("--timestep_scaling", type=float, default=10.0, help="tau of the boundary scalings")
    g.add_argument("--sigma_data", type=float, default=0.5)
    g.add_argument("--no_boundary", action="store_true", help="disable the consistency boundary scalings")
    g.add_argument("--ode_model", choices=("ema", "base", "online", "teacher"), default="ema",
                   help="model of the one-step PF-ODE: ema (base + EMA adapter, the paper's), base (frozen base "
                        "alone), online (stop-grad), teacher (base + --teacher_adapter)")
    g.add_argument("--eps_source", choices=("ddim", "true"), default="ddim")
    g.add_argument("--consistency_space", choices=("x", "eps"), default="eps",
                   help="distance of the consistency term: eps (the noises the two sides imply; the paper's noise "
                        "self-consistency, better at 1, 2 and 4 steps in the benchmark) or x (the outputs themselves)")
    g.add_argument("--guidance_weight", type=float, default=1.0, help="lambda of ||f - x||^2")
    g.add_argument("--min_snr_gamma", type=float, default=None,
                   help="weight the consistency term by the clipped SNR (Min-SNR-gamma, e.g. 5; default off)")
    g.add_argument("--min_snr_weighting", choices=("truncated", "x_space"), default="truncated",
                   help="truncated (the CoDi reference code's): min(SNR, gamma)/SNR on the loss as computed, keeps "
                        "the high-noise steps 1-4-step sampling needs; x_space (Hang et al.): an effective x-space "
                        "weight min(SNR, gamma), which nearly ignores them")
    g.add_argument("--ema_decay", type=float, default=0.999)
    g.add_argument("--ema_warmup", choices=("true", "false"), default="true",
                   help="EMA decay min(ema_decay, (1+n)/(10+n)) at update n, so the saved adapter is not mostly its "
                        "initialisation (recorded in the metadata)")
    g.add_argument("--cfg_range", type=str, default=None,
                   help="CFG-aware distillation: draw w in [w_min,w_max], e.g. 2,8 (default off)")
    _bool_flag(g, "--distill_guidance", "condition the adapter on w so it samples at cfg 1 (not available yet)")
    g.add_argument("--shared_timestep", choices=("true", "false"), default="true",
                   help="one t for the whole batch (the paper's choice) or one per sample")
    g.add_argument("--recommended_steps", type=int, default=4, help="stored in metadata for the nodes")


# --help lists the flags in these groups, in this order
GROUPS = (("configuration", _configuration_flags), ("model", _model_flags), ("data", _data_flags),
          ("memory", _memory_flags), ("optimizer", _optimizer_flags), ("length and precision", _length_flags),
          ("saving", _saving_flags), ("resume", _resume_flags), ("samples", _sample_flags),
          ("quality report", _quality_report_flags), ("logging", _logging_flags), ("adapter (CoDi)", _adapter_flags),
          ("CoDi distillation", _distillation_flags))


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="train.py",
        description=(
            "Distill a CoDi (Conditional Diffusion Distillation) adapter from your own Stable Diffusion checkpoint so "
            "that the checkpoint + adapter produce the conditional result in 1-4 steps. Flags follow kohya sd-scripts; "
            "every flag can also come from a TOML file given with --config_file."
        ),
        epilog=(
            "example:\n  python trainer/train.py --pretrained_model_name_or_path model.safetensors \\\n"
            "      --train_data_dir photos --conditioning_data_dir hints --resolution 512 \\\n"
            "      --adapter_type control-lora --optimizer_type AdamW8bit --max_train_steps 2000 --output_dir out\n"
            "  accelerate launch trainer/train.py --config_file codi.toml"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    for title, add in GROUPS:
        add(p.add_argument_group(title))
    return p


# diffusers spellings accepted as aliases
ALIASES = {
    "--pretrained_model_name_or_path": ["--pretrained_model"],
    "--train_batch_size": ["--batch_size"],
    "--conditioning_data_dir": ["--conditioning_image_dir"],
    "--max_train_steps": ["--num_train_steps"],
}


def _apply_aliases(argv: list[str]) -> list[str]:
    reverse = {alias: name for name, aliases in ALIASES.items() for alias in aliases}
    out = []
    for token in argv:
        key, eq, value = token.partition("=")
        out.append(reverse.get(key, key) + eq + value if key in reverse else token)
    return out


def load_toml(path: str | Path) -> dict:
    """Read a config TOML. Sections (e.g. [model], [optimizer]) are flattened: only the leaf keys matter."""
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise SystemExit(f"error: --config_file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise SystemExit(f"error: --config_file {path} is not valid TOML: {exc}") from None
    flat = {}

    def walk(table):
        for key, value in table.items():
            if isinstance(value, dict):
                walk(value)
            else:
                flat[key] = value

    walk(data)
    return flat


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    argv = _apply_aliases(list(sys.argv[1:] if argv is None else argv))
    pre, _ = parser.parse_known_args(argv)
    if pre.config_file:
        values = load_toml(pre.config_file)
        known = {a.dest for a in parser._actions}
        unknown = sorted(set(values) - known)
        if unknown:
            parser.error(f"unknown keys in {pre.config_file}: {', '.join(unknown)}")
        for key, value in values.items():
            problem = _toml_type_problem(parser, key, value)
            if problem:
                parser.error(f"{pre.config_file}: `{key} = {value!r}`: {problem}")
            if isinstance(value, list) and key not in LIST_FLAGS:
                values[key] = ",".join(str(v) for v in value)
            elif isinstance(value, bool) and key in CHOICE_SWITCHES:  # shared_timestep = true
                values[key] = "true" if value else "false"
        parser.set_defaults(**values)
    args = parser.parse_args(argv)
    return finalize(args, parser)


def _toml_type_problem(parser: argparse.ArgumentParser, key: str, value) -> str | None:
    """Why a TOML value does not fit its flag (the CLI's type and choices), or None. A switch wants true/false (the
    string "false" would switch it *on*), an integer flag an integer (2.5 is not 2 or 3), a list flag a list."""
    action = next(a for a in parser._actions if a.dest == key)
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        return None if isinstance(value, bool) else "a switch: write true or false (without quotes)"
    if key in LIST_FLAGS:
        return None if isinstance(value, list) and all(isinstance(v, str) for v in value) else \
            'a list of "KEY=VALUE" strings'
    if isinstance(value, bool):
        return None if action.choices is not None and "true" in action.choices else "not a switch: give a value"
    if action.type is int and not isinstance(value, int):
        return "an integer"
    if action.type is float and not isinstance(value, (int, float)):
        return "a number"
    if action.choices is not None and value not in action.choices:
        return f"one of {', '.join(map(str, action.choices))}"
    if action.type in (None, str) and not isinstance(value, (str, int, float, list)):
        return "a string"
    return None


def finalize(args: argparse.Namespace, parser: argparse.ArgumentParser) -> argparse.Namespace:
    """Derived values and cross-flag checks, with errors that say what to change."""
    if args.use_8bit_adam:
        args.optimizer_type = "AdamW8bit"
    for flag, dtype, eps in (("full_fp16", "fp16", "2^-11"), ("full_bf16", "bf16", "2^-8")):
        if getattr(args, flag):
            # half-precision master weights round every update below eps x |weight| away (in bf16,
            # 0.03 + 1e-5 == 0.03): at the learning rates adapters train with, most steps would vanish
            parser.error(f"--{flag} keeps the trainable weights in {dtype}, where an update smaller than {eps} of "
                         f"a weight is rounded away (in bf16, 0.03 + 1e-5 == 0.03): most steps at the learning rates "
                         f"adapters train with would vanish. Use --mixed_precision {dtype} alone (the frozen base in "
                         f"{dtype}, the small trainable adapter in float32) with --gradient_checkpointing and an "
                         f"8-bit optimizer to save memory")
    if args.network_alpha is None:
        args.network_alpha = float(args.network_dim)
    if args.unet_lora_alpha is None:
        args.unet_lora_alpha = float(args.unet_lora_dim)
    args.shared_timestep = str(args.shared_timestep).lower() == "true"
    args.ema_warmup = str(args.ema_warmup).lower() == "true"
    args.resume_changes = tuple(k.strip() for k in str(args.resume_changes or "").split(",") if k.strip())
    unsafe = [k for k in args.resume_changes if k not in SAFE_RESUME_CHANGES]
    if unsafe:
        parser.error(f"--resume_changes: {', '.join(unsafe)} cannot change on a resume (the state's weights and "
                     f"optimizer were made with them); only {', '.join(SAFE_RESUME_CHANGES)} can")
    if args.clip_skip is not None and args.clip_skip < 1:
        parser.error(f"--clip_skip must be >= 1 (1 = the last layer), got {args.clip_skip}")
    args.conditioning_embedding_channels = _numbers(parser, "conditioning_embedding_channels",
                                                    args.conditioning_embedding_channels, int, "16,32,96,256")
    if min(args.conditioning_embedding_channels) < 1:
        parser.error(f"--conditioning_embedding_channels must be positive, got {args.conditioning_embedding_channels}")
    if args.cfg_range:
        parts = _numbers(parser, "cfg_range", args.cfg_range, float, "2,8")
        if len(parts) != 2 or not 1.0 <= parts[0] <= parts[1]:
            parser.error(f"--cfg_range must be w_min,w_max with 1 <= w_min <= w_max, got {args.cfg_range}")
        args.cfg_range = tuple(parts)
    # 0 is allowed: it freezes the adapter (useful to check what --init_adapter loaded).
    if not math.isfinite(args.learning_rate) or args.learning_rate < 0:
        parser.error(f"--learning_rate must be a number >= 0, got {args.learning_rate}")
    if args.network_dim < 1:
        parser.error(f"--network_dim (the Control-LoRA rank) must be >= 1, got {args.network_dim}")
    if args.unet_lora_dim < 0:
        parser.error(f"--unet_lora_dim must be >= 0 (0: no UNet LoRA), got {args.unet_lora_dim}")
    if args.max_train_epochs is not None and args.max_train_epochs < 1:
        parser.error(f"--max_train_epochs must be >= 1, got {args.max_train_epochs} (leave it out to train "
                     "--max_train_steps steps)")
    if not args.output_name or os.sep in args.output_name or "/" in args.output_name or args.output_name in (".", ".."):
        parser.error(f"--output_name must be a plain file name without folders, got {args.output_name!r} (give the "
                     "folder with --output_dir)")
    if args.xformers and importlib.util.find_spec("xformers") is None:
        parser.error("--xformers needs the xformers package (pip install xformers); leave the flag out to use "
                     "PyTorch's scaled-dot-product attention")
    for tracker in {"all": ("tensorboard", "wandb")}.get(args.log_with, (args.log_with,) if args.log_with else ()):
        if importlib.util.find_spec(tracker) is None:
            parser.error(f"--log_with {args.log_with} needs the {tracker} package (pip install {tracker}); without "
                         "it nothing would be logged")
    if args.distill_guidance:
        # A w-conditioned adapter needs a guidance embedding that the stock ComfyUI/A1111 loaders cannot read; it
        # arrives together with the CoDi nodes that can. Refuse rather than train an adapter that ignores w.
        parser.error("--distill_guidance (w-conditioned adapters sampled at cfg 1) is not available yet; use "
                     "--cfg_range w_min,w_max alone for CFG-aware distillation")
    if args.ode_model == "teacher" and not args.teacher_adapter:
        parser.error("--ode_model teacher needs --teacher_adapter PATH (the frozen adapter whose PF-ODE is distilled)")
    if args.teacher_adapter and args.ode_model != "teacher":
        parser.error("--teacher_adapter is only used with --ode_model teacher")
    if args.loss == "diffusion" and (args.ode_model != "ema" or args.teacher_adapter or args.cfg_range):
        parser.error("--loss diffusion trains with the plain denoising loss: --ode_model, --teacher_adapter and "
                     "--cfg_range do not apply")
    for name in ("init_adapter", "teacher_adapter"):
        path = getattr(args, name)
        if path and not os.path.isfile(path):
            parser.error(f"--{name}: no such file: {path}")
    if args.resolution is not None:
        parts = _numbers(parser, "resolution", args.resolution, int, "512 or 512,768")
        if len(parts) not in (1, 2) or min(parts) < 64 or any(v % 8 for v in parts):
            parser.error(f"--resolution must be W or W,H, multiples of 8 and >= 64, got {args.resolution}")
        args.resolution = (parts[0], parts[-1])
    for name in ("max_train_steps", "train_batch_size", "gradient_accumulation_steps", "distill_grid",
                 "dataset_repeats"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if not 0.0 <= args.validation_split < 1.0:
        parser.error(f"--validation_split must be in [0, 1), got {args.validation_split}")
    if not 0.0 <= args.ema_decay < 1.0:
        parser.error(f"--ema_decay must be in [0, 1), got {args.ema_decay}")
    args.quality_report_steps = _numbers(parser, "quality_report_steps", args.quality_report_steps, int, "1,2,4")
    if min(args.quality_report_steps) < 1:
        parser.error(f"--quality_report_steps must be positive, got {args.quality_report_steps}")
    args.quality_hint_start = parse_strengths(parser, "--quality_hint_start", args.quality_hint_start)
    if args.quality_hint_start and args.task != "sr":
        parser.error("--quality_hint_start starts sampling from the bicubic upsample: it needs --task sr")
    if args.quality_report and not (args.validation_split or args.validation_data_dir):
        parser.error("--quality_report scores held-out pairs: add --validation_split 0.1 or --validation_data_dir")
    needs_model = args.output_config is None
    if needs_model and not args.pretrained_model_name_or_path:
        parser.error("--pretrained_model_name_or_path is required (a .safetensors/.ckpt file or a diffusers folder)")
    if needs_model and not args.dry_run and not (args.train_data_dir or args.dataset_config):
        parser.error("give the training images with --train_data_dir (or --dataset_config)")
    return args


def _numbers(parser, flag: str, value, kind, example: str) -> tuple:
    """``"16,32"`` -> ``(16, 32)`` (a single number too), or a one-line error naming the flag."""
    try:
        return tuple(kind(v) for v in str(value).split(","))
    except ValueError:
        parser.error(f"--{flag} must be comma-separated {'integers' if kind is int else 'numbers'} like {example}, "
                     f"got {value!r}")


def to_toml(args: argparse.Namespace) -> str:
    """The effective configuration as TOML (flag names as keys; unset values omitted)."""
    skip = {"config_file", "output_config", "dry_run"}
    lines = ["# CoDi trainer configuration (python trainer/train.py --config_file this.toml)"]
    for key, value in sorted(vars(args).items()):
        if key in skip or value is None:
            continue
        lines.append(f"{key} = {_toml_value(key, value)}")
    return "\n".join(lines) + "\n"


def _toml_value(key, value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        if key in LIST_FLAGS:
            return "[" + ", ".join(_toml_value(key, str(v)) for v in value) + "]"
        return _toml_value(key, ",".join(str(v) for v in value))
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'
