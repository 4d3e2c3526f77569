"""`--data SPEC` parsing and the three sources: sklearn digits, torchvision CIFAR-10, image folders.

Decoding happens once; the uint8 tensors are cached under the cache dir so a second load of the
same folder or archive takes about a second.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from autorank.data.dataset import Dataset
from autorank.errors import AutorankError

# torchvision's ImageNet statistics: the normalisation torchvision's pretrained models and the
# public CIFAR ResNet checkpoints expect, so RGB data keeps them rather than its own statistics.
RGB_MEAN = (0.485, 0.456, 0.406)
RGB_STD = (0.229, 0.224, 0.225)
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
VAL_FRACTION = 0.1
CACHE_VERSION = 1


def default_cache_dir() -> Path:
    return Path(os.environ.get("AUTORANK_CACHE", Path.home() / ".cache" / "autorank"))


def load_data(spec: str, *, cache_dir: Path | None = None, seed: int = 0) -> Dataset:
    """Load `digits`, `cifar10[:ROOT]` or `imagefolder:PATH` (a directory or .tar.gz archive)."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    kind, _, arg = spec.partition(":")
    if kind == "digits" and not arg:
        return _digits(seed)
    if kind == "cifar10":
        return _cifar10(Path(arg).expanduser() if arg else cache / "cifar10", seed)
    if kind == "imagefolder" and arg:
        return _imagefolder(Path(arg).expanduser(), cache)
    raise AutorankError(
        f"bad --data {spec!r}: expected 'digits', 'cifar10[:ROOT]' or 'imagefolder:PATH' (a folder or .tar.gz)"
    )


def _seeded_holdout(count: int, holdout: int, seed: int) -> tuple[Tensor, Tensor]:
    """Indices (kept, held out) of a seeded random split."""
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    return order[holdout:].sort().values, order[:holdout].sort().values


def _channel_stats(images: Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    x = images.float().div_(255.0).transpose(0, 1).reshape(images.shape[1], -1)
    return tuple(x.mean(1).tolist()), tuple(x.std(1).clamp_min(1e-3).tolist())


def _digits(seed: int) -> Dataset:
    """sklearn's bundled 8x8 digits (1,797 images, offline): 20% test, 10% val, seeded."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.from_numpy(np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)).unsqueeze(1)
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    rest, test = _seeded_holdout(len(labels), round(0.2 * len(labels)), seed)
    train_idx, val_idx = _seeded_holdout(len(rest), round(0.1 * len(labels)), seed + 1)
    train, val = rest[train_idx], rest[val_idx]
    splits = {name: (images[i], labels[i]) for name, i in (("train", train), ("val", val), ("test", test))}
    mean, std = _channel_stats(splits["train"][0])
    # flips and shifted crops change what a digit is: no augmentation
    return Dataset("digits", [str(c) for c in bunch.target_names], splits, mean, std, augment=False)


def _cifar10(root: Path, seed: int) -> Dataset:
    """torchvision's official CIFAR-10; downloads into ROOT when it is missing and the network allows."""
    from torchvision.datasets import CIFAR10

    def open_split(train: bool) -> CIFAR10:
        try:
            return CIFAR10(str(root), train=train, download=False)
        except RuntimeError:
            pass
        try:
            return CIFAR10(str(root), train=train, download=True)
        except Exception as exc:  # network down, disk full, corrupt archive
            raise AutorankError(
                f"CIFAR-10 not found in {root} and the download failed ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else 'no detail'})"
            ) from None

    train_set, test_set = open_split(True), open_split(False)

    def tensors(ds: CIFAR10) -> tuple[Tensor, Tensor]:
        return torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(ds.targets)

    images, labels = tensors(train_set)
    train, val = _seeded_holdout(len(labels), 5000, seed)
    splits = {"train": (images[train], labels[train]), "val": (images[val], labels[val]), "test": tensors(test_set)}
    return Dataset("cifar10", list(train_set.classes), splits, RGB_MEAN, RGB_STD, augment=True)


def _imagefolder(path: Path, cache: Path) -> Dataset:
    """`train/<class>/*` and `test/<class>/*`; val = the last 10% of each class's train files by name."""
    if not path.exists():
        raise AutorankError(f"image folder or archive not found: {path}")
    key = _fingerprint(path)
    tensor_file = cache / "decoded" / f"{path.name}-{key}.pt"
    if tensor_file.exists():
        try:
            stored = torch.load(tensor_file, weights_only=True)
            return _imagefolder_dataset(path, stored)
        except Exception:  # a truncated or stale cache file: decode again
            tensor_file.unlink(missing_ok=True)
    root = _extract(path, cache / "extracted" / f"{path.name}-{key}") if path.is_file() else path
    stored = _decode_folder(_find_split_root(root, path))
    tensor_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = tensor_file.with_suffix(".tmp")
    torch.save(stored, tmp)
    tmp.replace(tensor_file)
    return _imagefolder_dataset(path, stored)


def _fingerprint(path: Path) -> str:
    """Cache key: the archive's size and mtime, or every file's name, size and mtime in a folder."""
    digest = hashlib.sha256(f"{path.resolve()}|{CACHE_VERSION}".encode())
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        stat = file.stat()
        digest.update(f"|{file.relative_to(path) if path.is_dir() else ''}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def _imagefolder_dataset(path: Path, stored: dict) -> Dataset:
    splits = {s: (stored[f"{s}_images"], stored[f"{s}_labels"]) for s in ("train", "val", "test")}
    channels = splits["train"][0].shape[1]
    mean, std = (RGB_MEAN, RGB_STD) if channels == 3 else _channel_stats(splits["train"][0])
    name = path.name.removesuffix(".gz").removesuffix(".tar").removesuffix(".tgz")
    return Dataset(name, list(stored["classes"]), splits, mean, std, augment=True)


def _extract(archive: Path, target: Path) -> Path:
    """Extract once: into a temporary sibling, then an atomic rename, so a crash leaves no half folder."""
    if target.is_dir():
        return target
    if not tarfile.is_tarfile(archive):
        raise AutorankError(f"{archive} is neither a folder nor a tar archive")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".extract-"))
    try:
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")
        tmp.rename(target)
    except OSError:
        if not target.is_dir():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _find_split_root(root: Path, shown: Path) -> Path:
    """The folder holding train/ and test/: the root itself or its single top-level folder."""
    candidates = [root] + sorted(p for p in root.iterdir() if p.is_dir())
    for candidate in candidates:
        if (candidate / "train").is_dir() and (candidate / "test").is_dir():
            return candidate
    raise AutorankError(f"{shown} has no train/ and test/ folders (expected train/<class>/* and test/<class>/*)")


def _list_split(folder: Path, classes: list[str] | None) -> tuple[list[str], list[list[Path]]]:
    found = sorted(p.name for p in folder.iterdir() if p.is_dir())
    if classes is not None and found != classes:
        raise AutorankError(f"{folder} has classes {found[:5]}... but train/ has {classes[:5]}...")
    files = [sorted(p for p in (folder / c).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) for c in found]
    if not found or not any(files):
        raise AutorankError(f"{folder} holds no class folders with images")
    return found, files


def _decode_folder(root: Path) -> dict:
    classes, train_files = _list_split(root / "train", None)
    _, test_files = _list_split(root / "test", classes)
    groups: dict[str, list[tuple[Path, int]]] = {"train": [], "val": [], "test": []}
    for label, files in enumerate(train_files):
        n_val = int(round(VAL_FRACTION * len(files)))
        cut = len(files) - n_val
        groups["train"] += [(f, label) for f in files[:cut]]
        groups["val"] += [(f, label) for f in files[cut:]]
    for label, files in enumerate(test_files):
        groups["test"] += [(f, label) for f in files]
    first = _read_image(groups["train"][0][0], None, None)
    mode, size = first.mode, first.size
    stored: dict = {"classes": classes}
    for split, items in groups.items():
        images = _decode_all([f for f, _ in items], mode, size)
        stored[f"{split}_images"] = images
        stored[f"{split}_labels"] = torch.tensor([label for _, label in items], dtype=torch.int64)
    return stored


def _read_image(path: Path, mode: str | None, size: tuple[int, int] | None):
    from PIL import Image

    try:
        with Image.open(path) as img:
            img = img.convert(mode or ("L" if img.mode in ("L", "1", "I;16") else "RGB"))
            if size is not None and img.size != size:  # mixed sizes: resize to the first image's size
                img = img.resize(size, Image.BILINEAR)
            return img
    except OSError as exc:
        raise AutorankError(f"cannot read image {path}: {exc}") from None


def _decode_all(files: list[Path], mode: str, size: tuple[int, int]) -> Tensor:
    channels = 1 if mode == "L" else 3
    out = np.empty((len(files), size[1], size[0], channels), dtype=np.uint8)

    def decode(i: int) -> None:
        arr = np.asarray(_read_image(files[i], mode, size))
        out[i] = arr.reshape(size[1], size[0], channels)

    # Pillow releases the GIL while decoding, so threads use every core without pickling arrays
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        list(pool.map(decode, range(len(files)), chunksize=256))
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()
