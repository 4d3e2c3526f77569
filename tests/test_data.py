"""Data stage: spec parsing, splits, the decoded cache, and whole-batch normalisation/augmentation."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from autorank.data import load_data
from autorank.data import sources
from autorank.data.dataset import augment_batch, stratified_indices
from autorank.errors import AutorankError


@pytest.mark.parametrize(
    "spec", ["", "mnist", "digits:extra", "imagefolder", "imagefolder:", "cifar", "folder:/tmp"]
)
def test_bad_spec_is_a_one_line_error(spec):
    with pytest.raises(AutorankError, match="bad --data") as err:
        load_data(spec)
    assert "\n" not in str(err.value)


def test_missing_imagefolder_path(tmp_path):
    with pytest.raises(AutorankError, match="not found"):
        load_data(f"imagefolder:{tmp_path / 'nope.tar.gz'}", cache_dir=tmp_path)


def test_digits_splits_are_disjoint_seeded_and_uint8(digits):
    sizes = {name: len(y) for name, (_, y) in digits.splits.items()}
    assert sizes == {"train": 1258, "val": 180, "test": 359}
    assert digits.input_shape == (1, 8, 8) and digits.num_classes == 10 and not digits.augment
    all_images = torch.cat([x.flatten(1) for x, _ in digits.splits.values()])
    assert all_images.dtype == torch.uint8 and int(all_images.max()) == 255
    # every image lands in exactly one split: 1,797 images, and the unique rows match sklearn's
    from sklearn.datasets import load_digits

    assert len(all_images) == len(load_digits().target)
    again = load_data("digits", seed=0)
    assert torch.equal(again.splits["val"][0], digits.splits["val"][0])
    other = load_data("digits", seed=1)
    assert not torch.equal(other.splits["val"][1], digits.splits["val"][1])


def test_batches_normalise_limit_and_channels_last(digits):
    images, labels = digits.splits["val"]
    batches = list(digits.batches("val", 64, limit=100, channels_last=True))
    assert [len(y) for _, y in batches] == [64, 36]
    x = torch.cat([b for b, _ in batches])
    assert x.dtype == torch.float32 and batches[0][0].is_contiguous(memory_format=torch.channels_last)
    mean, std = torch.tensor(digits.mean).view(1, -1, 1, 1), torch.tensor(digits.std).view(1, -1, 1, 1)
    restored = (x * std + mean) * 255
    assert torch.allclose(restored, images[:100].float(), atol=1e-3)
    assert torch.equal(torch.cat([y for _, y in batches]), labels[:100])


def test_shuffled_batches_follow_the_generator(digits):
    def first_labels(seed):
        return next(digits.batches("train", 32, shuffle=True, generator=torch.Generator().manual_seed(seed)))[1]

    assert torch.equal(first_labels(3), first_labels(3))
    assert not torch.equal(first_labels(3), first_labels(4))


def test_stratified_indices_keep_class_shares_and_follow_the_seed():
    labels = torch.arange(10).repeat_interleave(torch.tensor([50, 50, 50, 50, 50, 100, 100, 100, 100, 350]))
    index = stratified_indices(labels, 100, seed=3)
    assert len(index) == 100 and torch.equal(index, torch.sort(torch.unique(index)).values)
    counts = torch.bincount(labels[index], minlength=10)
    assert counts.tolist() == [5, 5, 5, 5, 5, 10, 10, 10, 10, 35]
    assert torch.equal(index, stratified_indices(labels, 100, seed=3))
    assert not torch.equal(index, stratified_indices(labels, 100, seed=4))
    assert torch.equal(stratified_indices(labels, 5000), torch.arange(1000))


@pytest.mark.parametrize("name, split, limit", [("digits", "test", 100), ("cifar", "test", 2000)])
def test_sample_has_every_class_in_proportion_and_follows_the_seed(request, name, split, limit):
    data = request.getfixturevalue(name)
    images, labels = data.split(split)
    sample = data.sample(split, limit, seed=1)
    assert list(sample.splits) == [split] and sample.classes == data.classes
    picked_images, picked = sample.split(split)
    expected = torch.bincount(labels, minlength=data.num_classes) * limit / len(labels)
    counts = torch.bincount(picked, minlength=data.num_classes)
    assert counts.sum() == limit and counts.min() > 0
    assert (counts - expected).abs().max() < 1  # each class rounded from its exact share
    index = stratified_indices(labels, limit, seed=1)
    assert torch.equal(picked_images, images[index]) and torch.equal(picked, labels[index])  # real images, labels kept
    assert torch.equal(data.sample(split, limit, seed=1).split(split)[0], picked_images)
    assert not torch.equal(data.sample(split, limit, seed=2).split(split)[0], picked_images)
    assert data.sample(split, None).split(split)[1] is labels  # no limit: the whole split


def test_augment_is_a_padded_crop_and_optional_flip():
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(1, 256, (64, 3, 16, 16), dtype=torch.uint8, generator=gen)
    out = augment_batch(images, torch.Generator().manual_seed(1), padding=2)
    assert out.shape == images.shape and out.dtype == torch.uint8
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    flips = 0
    for i in range(len(images)):
        windows = {
            (dy, dx, flip): padded[i, :, dy : dy + 16, dx : dx + 16].flip(-1) if flip else padded[i, :, dy : dy + 16, dx : dx + 16]
            for dy in range(5) for dx in range(5) for flip in (False, True)
        }
        matches = [key for key, w in windows.items() if torch.equal(w, out[i])]
        assert matches, f"image {i} is not a crop of its padded original"
        flips += matches[0][2]
    assert 16 < flips < 48  # about half flipped
    assert not torch.equal(out, images)


def _write_folder(root, sizes=((8, 8), (8, 8), (10, 6))):
    """A small image folder: 2 classes, 10 train and 3 test PNGs each, one of a different size."""
    rng = np.random.default_rng(0)
    for split, count in (("train", 10), ("test", 3)):
        for cls in ("cat", "dog"):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(count):
                size = sizes[i % len(sizes)] if split == "train" else (8, 8)
                pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i:03d}.png")


def test_imagefolder_directory_splits_val_as_last_tenth_by_name(tmp_path):
    _write_folder(tmp_path / "pets")
    data = load_data(f"imagefolder:{tmp_path / 'pets'}", cache_dir=tmp_path / "cache")
    assert data.classes == ["cat", "dog"] and data.input_shape == (3, 8, 8)
    assert {k: len(y) for k, (_, y) in data.splits.items()} == {"train": 18, "val": 2, "test": 6}
    assert data.splits["val"][1].tolist() == [0, 1]
    last_cat = np.array(Image.open(tmp_path / "pets" / "train" / "cat" / "009.png").convert("RGB"))
    assert torch.equal(data.splits["val"][0][0], torch.from_numpy(last_cat).permute(2, 0, 1))
    assert data.mean == sources.RGB_MEAN  # RGB data keeps the normalisation pretrained models expect


def test_imagefolder_archive_is_extracted_and_decoded_once(tmp_path, monkeypatch):
    _write_folder(tmp_path / "src")
    archive = tmp_path / "pets.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "src", arcname="pets")  # one wrapping folder, as many archives have
    cache = tmp_path / "cache"
    first = load_data(f"imagefolder:{archive}", cache_dir=cache)
    assert len(list((cache / "extracted").iterdir())) == 1

    def no_decoding(*args):
        raise AssertionError("decoded again despite the cache")

    monkeypatch.setattr(sources, "_decode_folder", no_decoding)
    second = load_data(f"imagefolder:{archive}", cache_dir=cache)
    for split in ("train", "val", "test"):
        assert torch.equal(first.splits[split][0], second.splits[split][0])


def test_imagefolder_without_train_and_test_is_an_error(tmp_path):
    (tmp_path / "flat" / "cat").mkdir(parents=True)
    with pytest.raises(AutorankError, match="no train/ and test/"):
        load_data(f"imagefolder:{tmp_path / 'flat'}", cache_dir=tmp_path / "cache")


def test_cifar_image_folder_follows_the_shared_convention(cifar, shared):
    assert cifar.classes[:3] == ["airplane", "automobile", "bird"] and cifar.input_shape == (3, 32, 32)
    assert {k: len(y) for k, (_, y) in cifar.splits.items()} == {"train": 45000, "val": 5000, "test": 10000}
    assert cifar.splits["val"][1].bincount().tolist() == [500] * 10 and cifar.augment
    # val starts at each class's file 4500 (sorted by name), as ../shared/README.md specifies
    with tarfile.open(shared / "data" / "cifar10-jpeg.tar.gz") as tar:
        member = next(m for m in tar if m.name.endswith("train/bird/4500.jpg"))
        jpeg = Image.open(io.BytesIO(tar.extractfile(member).read())).convert("RGB")
    first_bird_val = cifar.splits["val"][0][1000]
    assert cifar.splits["val"][1][1000] == 2
    assert torch.equal(first_bird_val, torch.from_numpy(np.array(jpeg)).permute(2, 0, 1))


def test_cifar10_offline_without_files_is_a_clear_error(tmp_path, monkeypatch):
    from torchvision.datasets import CIFAR10

    def offline(self, *args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(CIFAR10, "download", offline)
    with pytest.raises(AutorankError, match="CIFAR-10 not found .* download failed"):
        load_data(f"cifar10:{tmp_path}")


def test_changing_a_folder_invalidates_its_cache(tmp_path):
    _write_folder(tmp_path / "pets")
    cache = tmp_path / "cache"
    before = load_data(f"imagefolder:{tmp_path / 'pets'}", cache_dir=cache)
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(tmp_path / "pets" / "test" / "dog" / "999.png")
    after = load_data(f"imagefolder:{tmp_path / 'pets'}", cache_dir=cache)
    assert len(after.splits["test"][1]) == len(before.splits["test"][1]) + 1
