"""Training data (``trainer/data``): sources (folders, paired folders, kohya dataset TOML), geometry (crops, buckets,
flips), determinism, caches with invalidation, validation split and the errors for bad inputs. Real photos from
scikit-image, resized small; no model (a tiny fake VAE / text encoder stands in where a cache needs one)."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from trainer.data.caches import LatentCache, TextCache, latent_cache_path
from trainer.data.dataset import ConditionCache, EpochBatches, build_datasets, collate, make_bucket_resolutions
from trainer.data.errors import DataError, DataWarning
from trainer.training.config import parse_args
from trainer.training.settings import Settings


def _photos() -> dict[str, np.ndarray]:
    from skimage import data

    return {"astronaut": data.astronaut(), "chelsea": data.chelsea(), "coffee": data.coffee(),
            "rocket": data.rocket(), "camera": np.stack([data.camera()] * 3, axis=-1)}


PHOTOS = None


def photo(name: str, size: tuple[int, int]) -> Image.Image:
    global PHOTOS
    if PHOTOS is None:
        PHOTOS = _photos()
    return Image.fromarray(PHOTOS[name]).convert("RGB").resize(size, Image.LANCZOS)


def make_folder(root: Path, sizes: dict[str, tuple[int, int]], conditions: bool = True,
                captions: bool = True) -> Path:
    """``root/images`` (+ ``root/conditions`` grey versions, same basename, + ``.txt`` captions)."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    if conditions:
        (root / "conditions").mkdir(exist_ok=True)
    for name, size in sizes.items():
        img = photo(name, size)
        img.save(root / "images" / f"{name}.png")
        if conditions:
            img.convert("L").convert("RGB").save(root / "conditions" / f"{name}.jpg", quality=98)
        if captions:
            (root / "images" / f"{name}.txt").write_text(f"a photo of {name}\n")
    return root


SQUARE = {"astronaut": (64, 64), "chelsea": (64, 64), "coffee": (64, 64), "rocket": (64, 64)}


def args_for(*flags):
    """The data settings of a run with these flags."""
    return Settings.from_args(parse_args(["--pretrained_model_name_or_path", "model.safetensors",
                                          *[str(f) for f in flags]])).data


def cli(root: Path, *flags):
    return args_for("--train_data_dir", root / "images", "--conditioning_data_dir", root / "conditions",
                    "--caption_extension", ".txt", "--resolution", "64", *flags)


# ------------------------------------------------------------------------------------------------ sources


def test_kohya_toml_as_users_write_it_matches_cli_flags(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "data", SQUARE)
    (root / "photos").symlink_to(root / "images")
    monkeypatch.chdir(tmp_path)  # kohya resolves relative paths from the working directory
    toml = tmp_path / "dataset.toml"
    # a kohya dataset TOML as kohya documents it, literally (paths adapted)
    toml.write_text(textwrap.dedent("""\
        [general]
        resolution = 64
        flip_aug = false            # any flip must hit target and condition identically
        [[datasets]]
        batch_size = 4
          [[datasets.subsets]]
          image_dir = "data/photos"
          caption_extension = ".txt"
          conditioning_data_dir = "data/conditions"   # same basenames as the targets; auto-resized
          num_repeats = 1
        """))
    from_toml, _ = build_datasets(args_for("--dataset_config", toml), (512, 512))
    from_cli, _ = build_datasets(args_for("--train_data_dir", "data/photos", "--conditioning_data_dir",
                                          "data/conditions", "--caption_extension", ".txt", "--resolution", "64",
                                          "--train_batch_size", "4", "--dataset_repeats", "1"), (512, 512))
    assert from_toml.items == from_cli.items
    assert [i.caption for i in from_toml.items] == [f"a photo of {n}" for n in sorted(SQUARE)]
    assert {i.condition for i in from_toml.items} == {"paired"} and all(i.num_repeats == 1 for i in from_toml.items)
    assert all(i.condition_path.suffix == ".jpg" for i in from_toml.items)  # any image extension
    assert from_toml.resolution == from_cli.resolution == (64, 64)
    assert [s.batch_size for s in from_toml.specs] == [s.batch_size for s in from_cli.specs] == [4]
    a, b = EpochBatches.from_dataset(from_toml, 1, 3), EpochBatches.from_dataset(from_cli, 4, 3)
    assert a.epoch_batches(0) == b.epoch_batches(0) and len(a.epoch_batches(0)[0]) == 4
    for i in range(len(from_cli)):
        x, y = from_toml[i], from_cli[i]
        assert torch.equal(x["pixel_values"], y["pixel_values"]) and torch.equal(x["hint"], y["hint"])


def test_toml_generated_condition_inheritance_and_repeats_match_cli(tmp_path):
    root = make_folder(tmp_path, SQUARE, conditions=False)
    toml = tmp_path / "sr.toml"
    toml.write_text(textwrap.dedent(f"""\
        [general]
        resolution = 64
        caption_extension = ".txt"
        flip_aug = true
        [[datasets]]
        batch_size = 2
        random_crop = true
          [[datasets.subsets]]
          image_dir = "{root / 'images'}"
          condition = "sr"
          sr_scale = 4
          num_repeats = 3
        """))
    from_toml, _ = build_datasets(args_for("--dataset_config", toml), (512, 512))
    from_cli, _ = build_datasets(args_for("--train_data_dir", root / "images", "--task", "sr", "--sr_scale", "4",
                                          "--caption_extension", ".txt", "--resolution", "64", "--flip_aug",
                                          "--random_crop", "--dataset_repeats", "3", "--train_batch_size", "2"),
                                 (512, 512))
    assert from_toml.items == from_cli.items
    item = from_toml.items[0]
    assert (item.condition, dict(item.condition_options), item.num_repeats) == ("sr", {"sr_scale": 4}, 3)
    assert item.flip_aug and item.random_crop  # [general] -> dataset -> subset
    batches = EpochBatches.from_dataset(from_toml, 1, 0)
    assert len(batches) == len(SQUARE) * 3 // 2
    sample = from_toml.get(0, 0)
    assert sample["hint"].shape == (3, 64, 64) and "mask" not in sample


def test_several_datasets_never_mix_in_a_batch(tmp_path):
    a = make_folder(tmp_path / "a", {"astronaut": (64, 64), "chelsea": (64, 64), "coffee": (64, 64)})
    b = make_folder(tmp_path / "b", {"rocket": (96, 96), "camera": (96, 96)}, conditions=False)
    toml = tmp_path / "two.toml"
    toml.write_text(textwrap.dedent(f"""\
        [general]
        caption_extension = ".txt"
        [[datasets]]
        resolution = 64
        batch_size = 3
          [[datasets.subsets]]
          image_dir = "{a / 'images'}"
          conditioning_data_dir = "{a / 'conditions'}"
        [[datasets]]
        resolution = 96
        batch_size = 2
          [[datasets.subsets]]
          image_dir = "{b / 'images'}"
          condition = "gray"
        """))
    dataset, _ = build_datasets(args_for("--dataset_config", toml), (512, 512))
    batches = EpochBatches.from_dataset(dataset, 1, 0)
    assert len(batches) == 2
    for epoch in range(3):
        for batch in batches.epoch_batches(epoch):
            assert len({dataset.group(i) for i in batch}) == 1
            assert len(batch) == dataset.batch_size_of(batch[0])
            samples = collate([dataset.get(i, epoch) for i in batch])
            assert samples["pixel_values"].shape[-1] == dataset.specs[dataset.items[batch[0]].dataset].resolution[0]


# ------------------------------------------------------------------------------------------------ bad inputs


def test_missing_condition_errors_or_skips_with_count(tmp_path):
    root = make_folder(tmp_path, SQUARE)
    (root / "conditions" / "coffee.jpg").unlink()
    (root / "conditions" / "rocket.jpg").unlink()
    with pytest.raises(DataError, match=r"2 of 4 images have no condition image.*coffee\.png, rocket\.png"):
        build_datasets(cli(root), (64, 64))
    with pytest.warns(DataWarning, match=r"skipped 2 of 4 images.*coffee\.png, rocket\.png"):
        dataset, _ = build_datasets(cli(root, "--skip_missing"), (64, 64))
    assert [i.image_path.stem for i in dataset.items] == ["astronaut", "chelsea"]


def test_corrupt_image_is_named(tmp_path):
    root = make_folder(tmp_path, SQUARE)
    (root / "images" / "broken.png").write_bytes(b"\x89PNG not really")
    (root / "conditions" / "broken.png").write_bytes((root / "conditions" / "rocket.jpg").read_bytes())
    with pytest.raises(DataError, match=r"cannot read image .*broken\.png"):
        build_datasets(cli(root), (64, 64))


def test_small_images_warn_with_count_and_are_upscaled(tmp_path):
    root = make_folder(tmp_path, {"astronaut": (32, 32), "chelsea": (48, 48), "coffee": (64, 64)})
    with pytest.warns(DataWarning, match=r"2 of 3 images are smaller than their training size.*astronaut\.png "
                                         r"\(32x32 < 64x64\)"):
        dataset, _ = build_datasets(cli(root), (64, 64))
    assert dataset[0]["pixel_values"].shape == (3, 64, 64)


def test_condition_size_mismatch_is_resized_but_aspect_mismatch_is_an_error(tmp_path):
    root = make_folder(tmp_path, {"astronaut": (64, 64), "chelsea": (96, 64)})
    # same shape, twice the size: auto-resized, same geometry as the target
    photo("chelsea", (192, 128)).convert("L").convert("RGB").save(root / "conditions" / "chelsea.jpg", quality=98)
    dataset, _ = build_datasets(cli(root), (64, 64))
    sample = dataset[1]
    gray = (sample["pixel_values"] + 1) / 2
    gray = 0.299 * gray[0] + 0.587 * gray[1] + 0.114 * gray[2]
    assert float((sample["hint"][0] - gray).abs().mean()) < 0.03
    photo("chelsea", (128, 128)).save(root / "conditions" / "chelsea.jpg")
    with pytest.raises(DataError, match=r"another aspect ratio.*chelsea\.png 96x64 vs chelsea\.jpg 128x128"):
        build_datasets(cli(root), (64, 64))


def test_empty_folder_and_missing_condition_source(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "conditions").mkdir()
    with pytest.raises(DataError, match=r"images contains no images"):
        build_datasets(cli(tmp_path), (64, 64))
    make_folder(tmp_path, SQUARE, conditions=False)
    with pytest.raises(DataError, match=r"--conditioning_data_dir.*--task"):
        build_datasets(args_for("--train_data_dir", tmp_path / "images", "--resolution", "64"), (64, 64))


def test_unknown_toml_keys_warn_naming_them(tmp_path):
    root = make_folder(tmp_path, SQUARE)
    toml = tmp_path / "d.toml"
    toml.write_text(textwrap.dedent(f"""\
        [general]
        resolution = 64
        shuffle_caption = true
        resolutoin = 512
        [[datasets]]
          [[datasets.subsets]]
          image_dir = "{root / 'images'}"
          conditioning_data_dir = "{root / 'conditions'}"
          num_repeat = 2
        """))
    with pytest.warns(DataWarning) as record:
        dataset, _ = build_datasets(args_for("--dataset_config", toml), (512, 512))
    messages = "\n".join(str(r.message) for r in record)
    assert "unknown keys resolutoin" in messages and "unknown keys num_repeat" in messages
    assert "shuffle_caption" in messages and "subset #1" in messages
    assert len(dataset) == 4


# ------------------------------------------------------------------------------------------------ geometry


def test_bucket_list_is_kohyas():
    """kohya sd-scripts' make_bucket_resolutions((512, 512)) with its defaults (min 256, max 1024, steps 64)."""
    assert make_bucket_resolutions((512, 512), 256, 1024, 64) == [
        (256, 832), (256, 896), (256, 960), (256, 1024), (320, 704), (320, 768), (384, 640), (448, 576), (512, 512),
        (576, 448), (640, 384), (704, 320), (768, 320), (832, 256), (896, 256), (960, 256), (1024, 256)]


def test_buckets_target_hint_geometry_and_flips(tmp_path):
    sizes = {"astronaut": (128, 64), "chelsea": (130, 64), "coffee": (64, 128), "rocket": (96, 96), "camera": (90, 96)}
    root = make_folder(tmp_path, sizes)
    args = cli(root, "--resolution", "96", "--enable_bucket", "--bucket_reso_steps", "32", "--min_bucket_reso",
               "64", "--max_bucket_reso", "160", "--flip_aug", "--train_batch_size", "2")
    with pytest.warns(DataWarning, match=r"1 of 5 images are smaller .*camera\.png \(90x96 < 96x96\)"):
        dataset, _ = build_datasets(args, (512, 512))
    geometry = dict(zip([i.image_path.stem for i in dataset.items], dataset.geometry))
    assert geometry == {"astronaut": (128, 64), "chelsea": (128, 64), "coffee": (64, 128), "rocket": (96, 96),
                        "camera": (96, 96)}
    with pytest.warns(DataWarning, match=r"1 image entries in buckets smaller than one batch are never trained: "
                                         r"dataset 1 64x128: 1"):  # coffee alone in its bucket
        batches = EpochBatches.from_dataset(dataset, 2, 5)
    flipped = 0
    for epoch in range(4):
        for batch in batches.epoch_batches(epoch):
            samples = collate([dataset.get(i, epoch) for i in batch])  # stacking fails if sizes mixed
            for row, index in enumerate(batch):
                w, h = dataset.geometry[index]
                assert samples["pixel_values"][row].shape == samples["hint"][row].shape == (3, h, w)
                plain = dataset.get(index, epoch, flip=False)
                if samples["flip"][row]:
                    flipped += 1
                    assert torch.equal(samples["pixel_values"][row], plain["pixel_values"].flip(-1))
                    assert torch.equal(samples["hint"][row], plain["hint"].flip(-1))
                else:
                    assert torch.equal(samples["hint"][row], plain["hint"])
                # the hint is the grey version of the very pixels of the target (same crop)
                rgb = (samples["pixel_values"][row] + 1) / 2
                luma = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
                assert float((samples["hint"][row][0] - luma).abs().mean()) < 0.03
    assert flipped > 0


def test_same_seed_epoch_index_same_sample_other_epoch_other_crop(tmp_path):
    root = make_folder(tmp_path, {"astronaut": (96, 80), "chelsea": (100, 80), "coffee": (120, 80)},
                       conditions=False)
    args = args_for("--train_data_dir", root / "images", "--task", "inpaint", "--resolution", "64", "--random_crop",
                    "--flip_aug", "--seed", "11")
    first, _ = build_datasets(args, (64, 64))
    again, _ = build_datasets(args, (64, 64))
    for index in range(3):
        a, b = first.get(index, 2), again.get(index, 2)
        assert a.keys() == b.keys() and "mask" in a and a["mask"].shape == (1, 64, 64)
        assert all(torch.equal(a[k], b[k]) for k in ("pixel_values", "hint", "mask"))
        others = [first.get(index, epoch) for epoch in range(3, 8)]
        assert any(not torch.equal(a["pixel_values"], o["pixel_values"]) for o in others)  # crop / flip
        assert any(not torch.equal(a["mask"], o["mask"]) for o in others)                  # condition rng
    # the inpaint hint marks the masked pixels (-1) exactly where the mask is, after the shared flip
    sample = first.get(0, 4)
    assert torch.all(sample["hint"][:, sample["mask"][0] > 0.5] == -1.0)
    batch = collate([first.get(i, 0) for i in range(3)])
    assert batch["mask"].shape == (3, 1, 64, 64)


def test_epoch_batches_are_rank_sharded_and_match_the_plain_permutation():
    plain = EpochBatches(10, 2, seed=4)
    order = torch.randperm(10, generator=torch.Generator().manual_seed(4 + 1)).tolist()
    assert [plain.batch(1, p) for p in range(len(plain))] == [order[i:i + 2] for i in range(0, 10, 2)]
    ranks = [EpochBatches(10, 2, seed=4, world_size=2, rank=r) for r in range(2)]
    full = EpochBatches(10, 4, seed=4)
    for p in range(len(full)):
        assert sorted(ranks[0].batch(3, p) + ranks[1].batch(3, p)) == sorted(full.batch(3, p))
        assert ranks[0].batch(3, p) == full.batch(3, p)[0::2]


# ------------------------------------------------------------------------------------------------ caches


class FakeVAE(torch.nn.Module):
    """A one-conv "VAE" (8x down, mean + log-variance) with the encode() interface of diffusers' AutoencoderKL."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.encoder = torch.nn.Conv2d(3, 8, 8, stride=8)
        self.calls = 0

    @property
    def device(self):
        return self.encoder.weight.device

    @property
    def dtype(self):
        return self.encoder.weight.dtype

    def encode(self, x):
        self.calls += x.shape[0]
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        return SimpleNamespace(latent_dist=SimpleNamespace(mean=mean, std=torch.exp(0.5 * logvar)))


@pytest.mark.filterwarnings("ignore:3 of 3 images are smaller:trainer.data.errors.DataWarning")  # the 96 px run
def test_latent_disk_cache_reencodes_only_what_changed(tmp_path):
    root = make_folder(tmp_path, {"astronaut": (64, 64), "chelsea": (64, 64), "coffee": (64, 64)})
    base = SimpleNamespace(vae=FakeVAE(), vae_scaling_factor=0.18215, architecture="sd1")

    def cache(*flags):
        args = cli(root, "--cache_latents_to_disk", *flags)
        dataset, _ = build_datasets(args, (64, 64))
        return LatentCache(dataset, base, seed=args.seed, to_disk=True), dataset

    first, dataset = cache()
    assert (first.encoded, first.loaded) == (3, 0)
    assert all(latent_cache_path(i.image_path).is_file() for i in dataset.items)
    second, _ = cache()
    assert (second.encoded, second.loaded) == (0, 3)
    assert torch.equal(first.get([0, 1, 2]), second.get([0, 1, 2]))
    # the cached latent is what the uncached training path draws
    from trainer.data.caches import encode_latents

    pixels = torch.stack([dataset[i]["pixel_values"] for i in range(3)])
    assert torch.allclose(encode_latents(base.vae, pixels, [0, 1, 2], 42, 0.18215), second.get([0, 1, 2]),
                          atol=1e-6)
    path = root / "images" / "chelsea.png"
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))  # touched
    assert cache()[0].encoded == 1
    photo("rocket", (64, 64)).save(root / "images" / "coffee.png")          # content changed
    assert cache()[0].encoded == 1
    assert cache()[0].encoded == 0
    assert cache("--resolution", "96")[0].encoded == 3                           # a setting changed
    assert cache("--resolution", "96")[0].encoded == 0
    base.vae = FakeVAE(seed=1)                                                # another VAE
    assert cache("--resolution", "96")[0].encoded == 3


def test_latent_cache_flips_and_random_crop(tmp_path):
    root = make_folder(tmp_path, {"astronaut": (64, 64), "chelsea": (80, 64)})
    base = SimpleNamespace(vae=FakeVAE(), vae_scaling_factor=1.0, architecture="sd1")
    args = cli(root, "--cache_latents", "--random_crop")
    dataset, _ = build_datasets(args, (64, 64))
    with pytest.raises(DataError, match="--random_crop cannot be combined with --cache_latents"):
        LatentCache(dataset, base, seed=args.seed)
    args = cli(root, "--cache_latents", "--flip_aug")
    dataset, _ = build_datasets(args, (64, 64))
    cache = LatentCache(dataset, base, seed=args.seed)
    assert cache.encoded == 2 and base.vae.calls == 4  # both views of both images
    from trainer.data.caches import encode_latents

    for flip in (False, True):
        pixels = torch.stack([dataset.get(i, 0, flip=flip)["pixel_values"] for i in range(2)])
        assert torch.allclose(cache.get([0, 1], [flip, flip]), encode_latents(base.vae, pixels, [0, 1], 42, 1.0),
                              atol=1e-6)


def test_text_cache_once_per_caption():
    calls = []
    base = SimpleNamespace(encode_text=lambda captions, device=None: (calls.extend(captions),
                                                                      {"encoder_hidden_states": torch.ones(1, 2)})[1])
    cache = TextCache(base, ["a cat", "a dog", "a cat", "a cat"], "cpu")
    assert sorted(calls) == ["", "a cat", "a dog"] and cache.encoded == 3
    assert cache.get(["a cat", "a cat", "a dog"], "cpu")["encoder_hidden_states"].shape == (3, 2)


def test_deterministic_conditions_are_cached_random_ones_are_not(tmp_path):
    from trainer.data.conditions import make_condition_builder

    root = make_folder(tmp_path, SQUARE, conditions=False)
    calls = []

    def counting(task, **options):
        real = make_condition_builder(task, **options)

        def builder(target, rng):
            calls.append(task)
            return real(target, rng)

        builder.is_deterministic = real.is_deterministic
        return builder

    for task, expected in (("gray", 4), ("blur", 12)):
        calls.clear()
        args = args_for("--train_data_dir", root / "images", "--task", task, "--resolution", "64", "--cache_latents")
        dataset, _ = build_datasets(args, (64, 64), builder_factory=counting)
        first = [dataset.get(i, 0)["hint"] for i in range(4)]
        for epoch in (1, 2):
            hints = [dataset.get(i, epoch)["hint"] for i in range(4)]
            assert all(torch.equal(a, b) for a, b in zip(first, hints)) == (task == "gray")
        assert len(calls) == expected
        if task == "gray":
            assert isinstance(dataset.condition_cache, ConditionCache) and dataset.condition_cache.computed == 4


# ------------------------------------------------------------------------------------------------ validation


def test_validation_split_by_image_deterministic_disjoint(tmp_path):
    names = {"astronaut": (64, 64), "chelsea": (64, 64), "coffee": (64, 64), "rocket": (64, 64), "camera": (64, 64)}
    root = make_folder(tmp_path, names)
    toml = tmp_path / "twice.toml"  # the same folder in two subsets: an image is still on one side only
    toml.write_text(textwrap.dedent(f"""\
        [general]
        resolution = 64
        caption_extension = ".txt"
        validation_split = 0.4
        [[datasets]]
          [[datasets.subsets]]
          image_dir = "{root / 'images'}"
          conditioning_data_dir = "{root / 'conditions'}"
          [[datasets.subsets]]
          image_dir = "{root / 'images'}"
          conditioning_data_dir = "{root / 'conditions'}"
          num_repeats = 2
        """))
    splits = []
    for seed in (1, 1, 2, 3, 4):
        train, val = build_datasets(args_for("--dataset_config", toml, "--seed", seed), (64, 64))
        train_paths = {i.image_path for i in train.items}
        val_paths = {i.image_path for i in val.items}
        assert not train_paths & val_paths and len(train_paths | val_paths) == 5 and len(val_paths) == 2
        assert len(val) == 2 and len(train) == 6  # 3 images x 2 subsets; validation: each image once
        splits.append(frozenset(val_paths))
    assert splits[0] == splits[1] and len(set(splits)) > 1
    train, val = build_datasets(cli(root, "--validation_split", "0.2", "--seed", "1", "--flip_aug"), (64, 64))
    assert len(val) == 1 and len(train) == 4 and val.validation
    assert val.items[0].image_path not in {i.image_path for i in train.items}
    # validation samples are fixed: no flip, center crop, whatever the epoch
    assert all(torch.equal(val.get(0, 0)[k], val.get(0, e)[k]) for e in range(1, 6) for k in ("pixel_values", "hint"))
    assert not val.get(0, 3)["flip"]


def test_validation_data_dir_and_generated_validation_conditions(tmp_path):
    train_root = make_folder(tmp_path / "train", SQUARE, conditions=False)
    val_root = make_folder(tmp_path / "val", {"camera": (64, 80)}, conditions=False)
    args = args_for("--train_data_dir", train_root / "images", "--task", "sr", "--sr_scale", "2", "--resolution",
                    "64", "--validation_data_dir", val_root / "images", "--random_crop", "--flip_aug")
    train, val = build_datasets(args, (64, 64))
    assert [i.image_path.stem for i in val.items] == ["camera"] and len(train) == 4
    again = build_datasets(args, (64, 64))[1]
    a, b = val.get(0, 0), again.get(0, 9)
    assert torch.equal(a["hint"], b["hint"]) and torch.equal(a["pixel_values"], b["pixel_values"])
    with pytest.raises(DataError, match="--validation_conditioning_data_dir"):
        build_datasets(cli(make_folder(tmp_path / "paired", SQUARE), "--validation_data_dir", val_root / "images"),
                       (64, 64))
