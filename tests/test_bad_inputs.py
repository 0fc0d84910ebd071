"""Layer B: the trainer attacked with the inputs a careless or unlucky user gives it.

Every case runs ``trainer/train.py`` as a user does (a subprocess) on the micro SD1.5 checkpoint and real photos, and
asserts what the user sees and keeps: the exit code, one line that names the file or flag, no traceback, and that
nothing which existed before the run was changed or deleted. The data fixes (16-bit targets, EXIF orientation) are
checked on the loaders directly. Disk-full cases run the trainer in a private mount namespace (``unshare``) with
its output folder on a small tmpfs, so the disk really is full.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from trainer.data.images import image_size, load_condition_image, load_rgb
from trainer_helpers import base_args, read_adapter

REPO = Path(__file__).resolve().parents[1]
TRAIN = str(REPO / "trainer" / "train.py")


# ------------------------------------------------------------------------------------------------ helpers

def run_train(args, env=None, prefix=(), timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([*prefix, sys.executable, TRAIN, *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout)


def digest(*roots: Path) -> dict[str, str]:
    """Every file and folder under ``roots`` with its content hash ('dir' for folders)."""
    found = {}
    for root in roots:
        for path in [root, *root.rglob("*")] if root.exists() else []:
            found[str(path)] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def assert_unchanged(before: dict[str, str]) -> None:
    after = digest(*{Path(p) for p in before})
    changed = [p for p, h in before.items() if after.get(p) != h]
    assert not changed, f"the run changed or deleted what existed before it: {changed[:5]}"


def assert_user_error(result: subprocess.CompletedProcess, code: int, *needles: str) -> str:
    """Exit ``code``, no traceback, and one stderr line holding every needle; returns that line."""
    output = result.stdout + result.stderr
    assert "Traceback" not in output, output[-3000:]
    assert result.returncode == code, f"exit {result.returncode}\n{output[-3000:]}"
    lines = [line for line in result.stderr.splitlines() if all(n in line for n in needles)]
    assert lines, f"no stderr line holds {needles}:\n{result.stderr[-3000:]}"
    return lines[0]


@pytest.fixture
def pairs(gray_pairs, tmp_path) -> Path:
    """A copy of the colorization pairs this test may damage."""
    root = tmp_path / "data"
    shutil.copytree(gray_pairs, root)
    return root


@pytest.fixture
def args(micro_sd15, pairs, tmp_path, sd1_tokenizer_dir):
    """``args(*extra, out=...)``: the flags of a short micro-SD1.5 run."""
    def build(*extra, out=None):
        return base_args(micro_sd15.path, pairs, out or tmp_path / "out", sd1_tokenizer_dir,
                         "--max_train_steps", "2", "--adapter_type", "control-lora", "--network_dim", "4", *extra)
    return build


def unshare_works() -> bool:
    if shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode == 0


def on_small_disk(folder: Path, size: str, then: str = "") -> list[str]:
    """A command prefix: the trainer runs with ``folder`` on a ``size`` tmpfs of its own (gone when it exits);
    ``then`` is shell run meanwhile, e.g. to fill the disk at some point."""
    if not unshare_works():
        pytest.skip("needs `unshare -rm` (user + mount namespaces) to give the trainer a small disk")
    folder.mkdir(parents=True, exist_ok=True)
    script = (f'mount -t tmpfs -o size={size} tmpfs "{folder}" || exit 97; "$@" & pid=$!; {then} '
              f'wait $pid; code=$?; echo "== listing"; ls -a "{folder}"; exit $code')
    return ["unshare", "-rm", "sh", "-c", script, "sh"]


# ------------------------------------------------------------------------------------------------ flags

FLAG_CASES = {
    "resolution-abc": (["--resolution", "abc"], "--resolution"),
    "learning-rate-nan": (["--learning_rate", "nan"], "--learning_rate"),
    "learning-rate-negative": (["--learning_rate", "-1"], "--learning_rate"),
    "learning-rate-inf": (["--learning_rate", "inf"], "--learning_rate"),
    "network-dim-0": (["--network_dim", "0"], "--network_dim"),
    "embedding-channels-abc": (["--conditioning_embedding_channels", "16,abc"], "--conditioning_embedding_channels"),
    "epochs-0": (["--max_train_epochs", "0"], "--max_train_epochs"),
    "output-name-escapes": (["--output_name", "../x"], "--output_name"),
    "resume-change-unsafe": (["--resume_changes", "seed"], "--resume_changes"),
    "xformers-missing": (["--xformers"], "--xformers"),
    "wandb-missing": (["--log_with", "wandb"], "--log_with wandb"),
}


@pytest.mark.parametrize("case", FLAG_CASES)
def test_bad_flag_is_one_line(case, args, tmp_path):
    import importlib.util

    extra, needle = FLAG_CASES[case]
    if case.endswith("-missing") and importlib.util.find_spec(case.split("-")[0]) is not None:
        pytest.skip(f"{case.split('-')[0]} is installed here")
    before = digest(tmp_path)
    result = run_train(args(*extra))
    assert_user_error(result, 2, "codi: error:", needle)
    assert not (tmp_path / "out").exists() and not (tmp_path / "x.safetensors").exists()
    assert_unchanged(before)


TOML_CASES = {
    "switch-as-string": ('gradient_checkpointing = "false"', "gradient_checkpointing"),
    "fractional-steps": ("max_train_steps = 2.5", "max_train_steps"),
    "boolean-batch": ("train_batch_size = true", "train_batch_size"),
}


@pytest.mark.parametrize("case", TOML_CASES)
def test_bad_toml_value_is_refused(case, args, tmp_path):
    line, key = TOML_CASES[case]
    config = tmp_path / "config.toml"
    config.write_text(line + "\n")
    result = run_train(args("--config_file", config))
    assert_user_error(result, 2, str(config), key)
    assert not (tmp_path / "out").exists()


def test_dataset_toml_value_type(micro_sd15, pairs, tmp_path, sd1_tokenizer_dir):
    config = tmp_path / "dataset.toml"
    config.write_text(f'[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = "{pairs / "images"}"\n'
                      f'conditioning_data_dir = "{pairs / "conditions"}"\nnum_repeats = "two"\n')
    result = run_train(["--pretrained_model_name_or_path", micro_sd15.path, "--tokenizer_path", sd1_tokenizer_dir,
                        "--dataset_config", config, "--output_dir", tmp_path / "out", "--task", "gray",
                        "--max_train_steps", "2"])
    assert_user_error(result, 2, str(config), "num_repeats")


# ------------------------------------------------------------------------------------------------ data

def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


def _huge_png(path: Path, width: int = 20000, height: int = 20000) -> None:
    """A valid PNG header for an image past Pillow's decompression-bomb limit (no pixel data is needed: Pillow
    refuses it on opening)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def _jpeg_truncated(pairs: Path) -> Path:
    target = pairs / "images" / "astronaut.jpg"
    Image.open(pairs / "images" / "astronaut.png").save(target, quality=95)
    (pairs / "images" / "astronaut.png").unlink()
    _truncate(target)
    return target


def _caption_not_utf8(pairs: Path) -> Path:
    caption = pairs / "images" / "chelsea.txt"
    caption.write_bytes("a photo of a cat in Düsseldorf".encode("latin-1"))
    return caption


def _bomb(pairs: Path) -> Path:
    for folder in ("images", "conditions"):
        _huge_png(pairs / folder / "huge.png")
    return pairs / "images" / "huge.png"


def _truncated_condition(pairs: Path) -> Path:
    condition = pairs / "conditions" / "coffee.png"
    _truncate(condition, 0.3)
    return condition


DATA_CASES = {
    "truncated-jpeg": (_jpeg_truncated, "cannot read image"),
    "truncated-condition": (_truncated_condition, "cannot read image"),
    "caption-not-utf8": (_caption_not_utf8, "UTF-8"),
    "decompression-bomb": (_bomb, "downscale it"),
}


@pytest.mark.parametrize("case", DATA_CASES)
def test_bad_data_file_stops_before_training(case, args, pairs, tmp_path):
    damage, needle = DATA_CASES[case]
    bad = damage(pairs)
    before = digest(pairs)
    result = run_train(args())
    assert_user_error(result, 2, str(bad), needle)
    assert not list((tmp_path / "out").glob("*.safetensors")), "nothing is trained on bad data"
    assert_unchanged(before)


def test_bad_sample_prompt_stops_before_the_models_load(args, pairs, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"a cat --cn {pairs / 'conditions' / 'chelsea.png'} --s 2\n"
                       f"a rocket --cn {pairs / 'conditions' / 'rocket.png'} --s 99\n")
    started = time.time()
    result = run_train(args("--sample_prompts", prompts, "--sample_every_n_steps", "1"))
    assert_user_error(result, 2, f"{prompts}:2", "--s 99")
    print(f"refused in {time.time() - started:.1f} s")
    assert not list((tmp_path / "out").glob("*.safetensors"))


def test_file_damaged_during_training_stops_with_a_state(args, pairs, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, TRAIN, *map(str, args("--max_train_steps", "400",
                                                                  "--save_every_n_steps", "2", out=out))],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not (out / "adapter-step00000002.safetensors").exists():
        time.sleep(0.05)
    for name in ("astronaut", "chelsea", "coffee", "rocket"):
        _truncate(pairs / "images" / f"{name}.png", 0.2)
    stdout, stderr = proc.communicate(timeout=300)
    result = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    line = assert_user_error(result, 3, "cannot read image", "continue with --resume")
    folder = Path(line.rsplit("--resume ", 1)[1].strip())
    assert folder.is_dir() and (folder / "trainer_state.json").is_file()


def test_sixteen_bit_grey_target_is_scaled_not_clipped(tmp_path):
    levels = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    path = tmp_path / "depth16.png"
    Image.fromarray(levels).save(path)  # Pillow writes mode I;16
    assert Image.open(path).mode.startswith("I")
    rgb = np.asarray(load_rgb(path), dtype=np.float64)
    expected = levels.astype(np.float64) / 65535 * 255
    print(f"mean {rgb.mean():.1f} (true {expected.mean():.1f})")
    assert abs(rgb.mean() - expected.mean()) < 1.0 and np.abs(rgb[..., 0] - expected).max() <= 1.0


def test_exif_orientation_is_applied_everywhere(tmp_path):
    from skimage import data

    photo = Image.fromarray(data.astronaut()).resize((96, 64))  # landscape as displayed
    stored = photo.transpose(Image.Transpose.ROTATE_90)  # stored portrait, EXIF says "rotate 270 to display"
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    stored.save(path, exif=exif, quality=98)
    assert Image.open(path).size == (64, 96)
    assert image_size(path) == (96, 64)
    shown = np.asarray(load_rgb(path), dtype=np.float32)
    assert shown.shape == (64, 96, 3)
    assert np.abs(shown - np.asarray(photo, dtype=np.float32)).mean() < 6.0
    condition = load_condition_image(path, (96, 64), (0, 0, 96, 64))
    assert condition.shape == (64, 96, 3)
    assert np.abs(condition * 255 - np.asarray(photo, dtype=np.float32)).mean() < 6.0


# ------------------------------------------------------------------------------------------------ output

def test_output_dir_under_a_file(args, tmp_path):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("keep me")
    result = run_train(args(out=blocker / "out"))
    assert_user_error(result, 2, "--output_dir", str(blocker / "out"))
    assert blocker.read_text() == "keep me"


def test_second_trainer_on_the_same_name_is_refused(args, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    lock = out / ".adapter.lock"
    lock.write_text(f"{os.getpid()} {socket.gethostname()}")  # this live process holds it
    result = run_train(args(out=out))
    assert_user_error(result, 2, f"process {os.getpid()}", "--output_name")
    assert lock.is_file() and not (out / "adapter.safetensors").exists()
    lock.write_text(f"999999999 {socket.gethostname()}")  # a process that is gone: its lock is taken over
    result = run_train(args(out=out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert not lock.exists() and (out / "adapter.safetensors").is_file()
    umask = os.umask(0)
    os.umask(umask)
    # the user's umask, not mkstemp's 0600: a ComfyUI running as another user can read the adapter
    assert (out / "adapter.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask


def test_prune_keeps_other_runs_saves(args, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    other = [out / "adapter_v2-step00000001.safetensors", out / "adapter-final-step00000001.safetensors"]
    for path in other:
        path.write_bytes(b"another run's adapter")
    (out / "adapter_v2-step00000001-state").mkdir()
    (out / "adapter_v2-step00000001-state" / "trainer_state.json").write_text("{}")
    before = digest(out)
    result = run_train(args("--max_train_steps", "6", "--save_every_n_steps", "1", "--save_last_n_steps", "2",
                            "--save_state", out=out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert_unchanged(before)
    own = sorted(p.name for p in out.glob("adapter-step*"))
    assert own == ["adapter-step00000003-state", "adapter-step00000003.safetensors",
                   "adapter-step00000004-state", "adapter-step00000004.safetensors",
                   "adapter-step00000005-state", "adapter-step00000005.safetensors"], own


def test_not_enough_space_is_found_before_training(args, tmp_path):
    out = tmp_path / "small"
    result = run_train(args("--adapter_type", "controlnet", "--save_state", out=out),
                       prefix=on_small_disk(out, "64k"))
    assert result.returncode != 97, "could not mount the small disk"
    assert_user_error(result, 2, "--output_dir", "GiB free")
    assert "step" not in result.stdout.split("== listing")[-1]


def test_disk_full_during_training_rescues_the_run(args, tmp_path):
    out = tmp_path / "small"
    rescue_root = tmp_path / "tmp"
    rescue_root.mkdir()
    # the disk fills up once the step-2 save is written (the run checked there was room for what it keeps): the
    # step-4 save cannot be written
    fill = (f'while [ ! -e "{out}/adapter-step00000002.safetensors" ] && kill -0 $pid 2>/dev/null; '
            f'do sleep 0.05; done; cat /dev/zero > "{out}/filler" 2>/dev/null;')
    result = run_train(args("--max_train_steps", "400", "--save_every_n_steps", "2", "--save_last_n_steps", "4",
                            out=out), prefix=on_small_disk(out, "48m", then=fill), env={"TMPDIR": str(rescue_root)})
    assert result.returncode != 97, "could not mount the small disk"
    line = assert_user_error(result, 3, "could not save step", "continue with --resume")
    listing = result.stdout.split("== listing")[-1].split()
    assert not [name for name in listing if ".tmp" in name], f"temporary files left behind: {listing}"
    rescued = [p for p in rescue_root.iterdir() if p.name.startswith("codi-rescue-adapter-")]
    assert len(rescued) == 1, line
    state = Path(line.rsplit("--resume ", 1)[1].split()[0])
    assert state.parent == rescued[0] and (state / "optimizer.pt").is_file()
    tensors, metadata = read_adapter(next(rescued[0].glob("adapter*.safetensors")))
    assert int(metadata["ss_steps"]) >= 2
    assert all(torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point())


def test_cache_beside_a_read_only_data_folder(args, pairs, tmp_path):
    if not unshare_works():
        pytest.skip("needs `unshare -rm` (user + mount namespaces) to make a read-only folder as root")
    images = pairs / "images"
    before = digest(pairs)
    # a read-only bind mount: even root cannot write there (chmod does not stop root)
    prefix = ["unshare", "-rm", "sh", "-c", f'mount --bind "{images}" "{images}" && '
              f'mount -o remount,ro,bind "{images}" || exit 97; exec "$@"', "sh"]
    result = run_train(args("--cache_latents_to_disk"), prefix=prefix)
    assert result.returncode != 97, "could not make the folder read-only"
    assert result.returncode == 0, result.stderr[-3000:]
    assert "could not write the latent cache beside 4 images" in result.stderr, result.stderr[-3000:]
    assert (tmp_path / "out" / "adapter.safetensors").is_file()
    assert_unchanged(before)


# ------------------------------------------------------------------------------------------------ stopping

@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_saves_a_resumable_state(sig, args, tmp_path):
    out = tmp_path / "out"
    flags = args("--max_train_steps", "400", "--save_every_n_steps", "3", out=out)
    proc = subprocess.Popen([sys.executable, TRAIN, *map(str, flags)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not (out / "adapter-step00000003.safetensors").exists():
        time.sleep(0.05)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=300)
    result = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    line = assert_user_error(result, 130, f"{sig.name} received", "continue with --resume")
    state = Path(line.rsplit("--resume ", 1)[1].strip())
    assert (state / "trainer_state.json").is_file() and not (out / ".adapter.lock").exists()
    step = int(state.name.split("-step")[1][:8])
    assert 3 <= step < 400
    result = run_train(_with(flags, max_train_steps=step + 2) + ["--resume", state])
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"at step {step}" in result.stdout
    assert read_adapter(out / "adapter.safetensors")[1]["ss_steps"] == str(step + 2)


def test_huge_learning_rate_never_saves_diverged_weights(args, tmp_path):
    out = tmp_path / "out"
    result = run_train(args("--learning_rate", "1e30", "--max_train_steps", "6", "--save_every_n_steps", "1",
                            out=out))
    line = assert_user_error(result, 3, "diverged")
    print(line)
    for path in out.glob("*.safetensors"):
        tensors, _ = read_adapter(path)
        peak = max(float(t.float().abs().max()) for t in tensors.values() if t.is_floating_point() and t.numel())
        assert peak < 1e4, f"{path.name} holds weights up to {peak:.3g}"


# ------------------------------------------------------------------------------------------------ resume

@pytest.fixture
def saved_state(args, tmp_path) -> tuple[Path, list[str]]:
    flags = args("--save_state", "--optimizer_type", "AdamW8bit", out=tmp_path / "first")
    result = run_train(flags)
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp_path / "first" / "adapter-state", flags


def _with(flags: list[str], **changes) -> list[str]:
    """``flags`` with each ``--key`` set to the new value (every occurrence; added when missing)."""
    flags = [str(f) for f in flags]
    for key, value in changes.items():
        positions = [i for i, f in enumerate(flags) if f == f"--{key}"]
        for i in positions:
            flags[i + 1] = str(value)
        if not positions:
            flags += [f"--{key}", str(value)]
    return flags


def test_resume_with_other_settings(saved_state, tmp_path):
    state, flags = saved_state
    before = digest(state)
    resume = ["--resume", str(state), "--max_train_steps", "3"]
    cases = {
        "seed + batch": (dict(seed=8, train_batch_size=2), ["seed: 7", "train_batch_size: 1"]),
        "task": (dict(task="blur"), ["task: 'gray'"]),
        "optimizer": (dict(optimizer_type="AdamW"), ["optimizer_type: 'AdamW8bit'"]),
        "learning rate": (dict(learning_rate=3e-4), ["learning_rate", "--resume_changes learning_rate"]),
    }
    for name, (changes, needles) in cases.items():
        result = run_train(_with(flags, **changes) + resume)
        print(name, "->", assert_user_error(result, 2, f"--resume {state}", *needles))
        assert_unchanged(before)
    result = run_train(_with(flags, learning_rate=3e-4) + resume + ["--resume_changes", "learning_rate"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming with changed learning_rate" in result.stdout


def test_a_state_from_before_a_default_changed_names_the_flag_that_continues_it():
    from trainer.errors import CodiError
    from trainer.training.guard import check_resume_identity

    with pytest.raises(CodiError) as error:  # written when x-space was the default, resumed with today's eps
        check_resume_identity({"consistency_space": "x", "seed": 1}, {"consistency_space": "eps", "seed": 1}, (),
                              "out/run-state")
    assert "consistency_space: 'x' in the state, 'eps' now" in str(error.value)
    assert "add --consistency_space x to continue" in str(error.value)
    with pytest.raises(CodiError) as error:  # a value the user chose: no talk of defaults
        check_resume_identity({"consistency_space": "eps"}, {"consistency_space": "x"}, (), "out/run-state")
    assert "default" not in str(error.value)


def test_a_save_killed_mid_rename_is_recovered_and_its_leftovers_removed(saved_state):
    """A trainer killed inside the atomic state save leaves hidden ``.tmp-<pid>`` / ``.old-<pid>`` folders: the next
    run on that output name puts a complete one back in place (so --resume finds it) and removes the rest."""
    state, flags = saved_state
    out = state.parent
    complete = out / f".{state.name}.tmp-4242"
    os.replace(state, complete)  # killed between "old state moved away" and "new state moved in"
    partial = out / f".{state.name}.tmp-4243"
    partial.mkdir()
    (partial / "trainable.safetensors").write_bytes(b"half")
    stale_old = out / f".{state.name}.old-4244"
    shutil.copytree(complete, stale_old)
    result = run_train(flags + ["--resume", str(state), "--max_train_steps", "3"])
    assert result.returncode == 0, result.stderr[-3000:]
    # the complete temporary (the state being saved) wins over the older copy
    assert f"recovered {state.name} from {complete.name}, left by an interrupted save" in result.stdout
    assert "at step" in result.stdout
    assert not [p.name for p in out.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


@pytest.mark.parametrize("damaged", ["optimizer.pt", "trainable.safetensors", "trainer_state.json"])
def test_resume_from_a_damaged_state(damaged, saved_state):
    state, flags = saved_state
    _truncate(state / damaged, 0.5)
    result = run_train(flags + ["--resume", str(state), "--max_train_steps", "3"])
    assert_user_error(result, 2, f"--resume {state}", damaged)
