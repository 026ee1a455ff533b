"""Real image data sets as uint8 tensors (N, C, H, W) + int64 labels, and fast batch tools.

Supported: Fashion-MNIST (the default), MNIST, CIFAR-10, CIFAR-100 and GTSRB. Each is read
from its official on-disk format with numpy (no pickle): IDX files for the MNISTs, the binary
record files of CIFAR, PPM images + semicolon CSVs for GTSRB. A data set is looked for in
`root` (if given), in system folders (the Debian package `dataset-fashion-mnist`), then in the
user cache `cache_dir()/<name>`; if absent it is downloaded into the cache and checked against
the publisher's MD5. Archives (.tar.gz, .zip) found in a folder are unpacked there safely.

The batch tools (`take_subset`, `to_float`, `augment`, `iterate_batches`) work on whole
tensors already on the device, vectorised over the batch (no per-sample Python loops).
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import os
import shutil
import tarfile
import tempfile
import urllib.request
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np
import torch
from tqdm.auto import tqdm

from eglib.config import cache_dir
from eglib.io import write_atomic

SPLITS: tuple[str, ...] = ("train", "test")
_Arrays = tuple[np.ndarray, np.ndarray]  # images uint8 (N, C, H, W), labels (N,)


@dataclass(frozen=True)
class DatasetInfo:
    """Static facts about a data set: classes, channels, side length, whether h-flips suit it."""

    name: str
    num_classes: int
    in_channels: int
    image_size: int
    hflip: bool  # horizontal-flip augmentation keeps the class (False for digits and signs)


DATASETS: dict[str, DatasetInfo] = {
    "fashion-mnist": DatasetInfo("fashion-mnist", 10, 1, 28, hflip=True),
    "mnist": DatasetInfo("mnist", 10, 1, 28, hflip=False),
    "cifar10": DatasetInfo("cifar10", 10, 3, 32, hflip=True),
    "cifar100": DatasetInfo("cifar100", 100, 3, 32, hflip=True),
    "gtsrb": DatasetInfo("gtsrb", 43, 3, 32, hflip=False),
}


def dataset_info(name: str) -> DatasetInfo:
    """The `DatasetInfo` of a data set name; ValueError naming the allowed names if unknown."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; allowed: {sorted(DATASETS)}")
    return DATASETS[name]


# ----------------------------------------------------------------------------------------------
# Where the files live and where they come from
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Remote:
    """One official file: its URL, its publisher's MD5, and what it unpacks to (if an archive)."""

    url: str
    md5: str
    splits: tuple[str, ...]  # the splits that need this file
    unpacks_to: str | None = None  # relative path an archive creates; None: read as it is

    @property
    def filename(self) -> str:
        """The file's name on disk (the last URL component)."""
        return self.url.rsplit("/", 1)[-1]


_FASHION_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
_MNIST_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"
_GTSRB_URL = "https://sid.erda.dk/public/archives/daaeac0d7ce1152aea9b61d9f1e19370/"
_TRAIN, _TEST = ("train",), ("test",)

# MD5s as published by the data sets' authors (Fashion-MNIST README, yann.lecun.com via
# torchvision, cs.toronto.edu/~kriz/cifar.html, the GTSRB archive page).
REMOTES: dict[str, tuple[_Remote, ...]] = {
    "fashion-mnist": (
        _Remote(
            _FASHION_URL + "train-images-idx3-ubyte.gz", "8d4fb7e6c68d591d4c3dfef9ec88bf0d", _TRAIN
        ),
        _Remote(
            _FASHION_URL + "train-labels-idx1-ubyte.gz", "25c81989df183df01b3e8a0aad5dffbe", _TRAIN
        ),
        _Remote(
            _FASHION_URL + "t10k-images-idx3-ubyte.gz", "bef4ecab320f06d8554ea6380940ec79", _TEST
        ),
        _Remote(
            _FASHION_URL + "t10k-labels-idx1-ubyte.gz", "bb300cfdad3c16e7a12a480ee83cd310", _TEST
        ),
    ),
    "mnist": (
        _Remote(
            _MNIST_URL + "train-images-idx3-ubyte.gz", "f68b3c2dcbeaaa9fbdd348bbdeb94873", _TRAIN
        ),
        _Remote(
            _MNIST_URL + "train-labels-idx1-ubyte.gz", "d53e105ee54ea40749a09fcbcd1e9432", _TRAIN
        ),
        _Remote(
            _MNIST_URL + "t10k-images-idx3-ubyte.gz", "9fb629c4189551a2d022fa330f9573f3", _TEST
        ),
        _Remote(
            _MNIST_URL + "t10k-labels-idx1-ubyte.gz", "ec29112dd5afa0611ce80d1b7f02629c", _TEST
        ),
    ),
    "cifar10": (
        _Remote(
            "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",
            "c32a1d4ab5d03f1284b67883e8d87530",
            SPLITS,
            unpacks_to="cifar-10-batches-bin",
        ),
    ),
    "cifar100": (
        _Remote(
            "https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz",
            "03b5dce01913d631647c71ecec9e9cb8",
            SPLITS,
            unpacks_to="cifar-100-binary",
        ),
    ),
    "gtsrb": (
        _Remote(
            _GTSRB_URL + "GTSRB_Final_Training_Images.zip",
            "f33fd80ac59bff73c82d25ab499e03a3",
            _TRAIN,
            unpacks_to="GTSRB/Final_Training",
        ),
        _Remote(
            _GTSRB_URL + "GTSRB_Final_Test_Images.zip",
            "c7e4e6327067d32654124b0fe9e82185",
            _TEST,
            unpacks_to="GTSRB/Final_Test",
        ),
        _Remote(
            _GTSRB_URL + "GTSRB_Final_Test_GT.zip",
            "fe31e9c9270bbcd7b84b7f21a9d9d9e5",
            _TEST,
            unpacks_to="GT-final_test.csv",
        ),
    ),
}

# Folders installed by system packages, searched after `root` and before the user cache.
SYSTEM_FOLDERS: dict[str, tuple[Path, ...]] = {
    "fashion-mnist": (Path("/usr/share/datasets/fashion-mnist"),),
}

# The one command that installs a data set, where a system package exists.
INSTALL_COMMANDS: dict[str, str] = {
    "fashion-mnist": "sudo apt-get install dataset-fashion-mnist",
}


def _search_folders(name: str, root: str | os.PathLike[str] | None) -> list[Path]:
    """The folders searched for a data set, in order: root, system folders, the user cache."""
    folders = [Path(root).expanduser()] if root is not None else []
    return [*folders, *SYSTEM_FOLDERS.get(name, ()), cache_dir() / name]


def _md5(path: Path) -> str:
    """Hex MD5 of a file, read in chunks."""
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _download(remote: _Remote, folder: Path) -> None:
    """Fetch `remote` into `folder` atomically; ValueError if its MD5 is not the published one."""
    target = folder / remote.filename
    if target.is_file() and _md5(target) == remote.md5:
        return

    def fetch(out: IO[bytes]) -> None:
        digest = hashlib.md5(usedforsecurity=False)
        with urllib.request.urlopen(remote.url, timeout=60) as resp:
            while chunk := resp.read(1 << 20):
                out.write(chunk)
                digest.update(chunk)
        if digest.hexdigest() != remote.md5:
            raise ValueError(
                f"checksum mismatch for {remote.url}: md5 {digest.hexdigest()}, "
                f"expected {remote.md5}"
            )

    write_atomic(target, fetch)


def _unpack(archive: Path, member: str) -> None:
    """Unpack `member` (a relative path) of a .tar.gz/.zip next to it, atomically and safely.

    Tar members go through tarfile's 'data' filter (no absolute paths, links out of the folder
    or device files); zip extraction strips absolute paths and '..'. The archive is unpacked
    into a temporary folder and `member` is moved into place only when complete.
    """
    folder = archive.parent
    tmp = Path(tempfile.mkdtemp(dir=folder, prefix=".unpack-"))
    try:
        if archive.name.endswith(".zip"):
            with zipfile.ZipFile(archive) as zf:
                zf.extractall(tmp)
        else:
            with tarfile.open(archive, "r:*") as tf:  # filter=: Python 3.10.12+ / 3.11.4+
                tf.extractall(tmp, filter="data")
        if not (tmp / member).exists():
            raise ValueError(f"archive {archive} does not hold {member!r}")
        (folder / member).parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp / member, folder / member)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _unpack_archives(name: str, split: str, folder: Path) -> None:
    """Unpack the archives of `name` lying in `folder` whose contents are not there yet."""
    for remote in REMOTES[name]:
        if remote.unpacks_to is None or split not in remote.splits:
            continue
        archive = folder / remote.filename
        if archive.is_file() and not (folder / remote.unpacks_to).exists():
            _unpack(archive, remote.unpacks_to)


# ----------------------------------------------------------------------------------------------
# Format readers: each `_find_*` returns the files of one split in a folder (None if absent),
# each `_read_*` turns those files into numpy arrays.
# ----------------------------------------------------------------------------------------------

_IDX_PREFIX = {"train": "train", "test": "t10k"}


def _find_idx(folder: Path, split: str) -> list[Path] | None:
    """The images and labels IDX files (gzipped or raw) of a split in `folder`."""
    found = []
    for stem in (
        f"{_IDX_PREFIX[split]}-images-idx3-ubyte",
        f"{_IDX_PREFIX[split]}-labels-idx1-ubyte",
    ):
        candidates = [folder / f"{stem}.gz", folder / stem]
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            return None
        found.append(path)
    return found


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """Read an unsigned-byte IDX file (raw or .gz) of `ndim` dimensions; ValueError if malformed."""
    raw = path.read_bytes()
    if path.suffix == ".gz":
        raw = gzip.decompress(raw)
    magic = 0x0800 + ndim  # two zero bytes, type 0x08 (unsigned byte), number of dimensions
    if len(raw) < 4 + 4 * ndim or int.from_bytes(raw[:4], "big") != magic:
        raise ValueError(
            f"{path}: not an IDX file of {ndim}-d unsigned bytes (magic {magic:#010x})"
        )
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path}: header says {dims} ({np.prod(dims)} bytes), has {data.size}")
    return data.reshape(dims)


def _read_idx_pair(files: list[Path], info: DatasetInfo, progress: bool) -> _Arrays:
    """Images (N, 1, H, W) and labels from an images/labels IDX pair (fast: `progress` unused)."""
    images, labels = _read_idx(files[0], 3), _read_idx(files[1], 1)
    side = info.image_size
    if images.shape[1:] != (side, side):
        raise ValueError(f"{files[0]}: images are {images.shape[1:]}, expected {(side, side)}")
    if len(images) != len(labels):
        raise ValueError(f"{files[0]} has {len(images)} images but {files[1]} {len(labels)} labels")
    return images[:, None], labels


_CIFAR_FILES = {
    "cifar10": (
        "cifar-10-batches-bin",
        [f"data_batch_{i}.bin" for i in range(1, 6)],
        ["test_batch.bin"],
    ),
    "cifar100": ("cifar-100-binary", ["train.bin"], ["test.bin"]),
}
_CIFAR_PIXELS = 3 * 32 * 32


def _find_cifar(name: str) -> Callable[[Path, str], list[Path] | None]:
    """A finder for the binary record files of CIFAR-10 or CIFAR-100."""
    subdir, train, test = _CIFAR_FILES[name]

    def find(folder: Path, split: str) -> list[Path] | None:
        paths = [folder / subdir / f for f in (train if split == "train" else test)]
        return paths if all(p.is_file() for p in paths) else None

    return find


def _read_cifar(files: list[Path], info: DatasetInfo, progress: bool) -> _Arrays:
    """Images and labels from CIFAR binary record files (fast: `progress` unused).

    Each record is the label byte(s), then the R, G and B planes of a 32x32 image (3072 bytes).
    CIFAR-10 has one label byte; CIFAR-100 two (coarse, fine), of which the fine one is used.
    """
    label_bytes = 1 if info.num_classes == 10 else 2
    record = label_bytes + _CIFAR_PIXELS
    raw = np.concatenate([np.fromfile(f, dtype=np.uint8) for f in files])
    if raw.size == 0 or raw.size % record:
        raise ValueError(
            f"{files}: {raw.size} bytes is not a whole number of {record}-byte records"
        )
    rows = raw.reshape(-1, record)
    return rows[:, label_bytes:].reshape(-1, 3, 32, 32), rows[:, label_bytes - 1]


_GTSRB_SIZE = 32
_GTSRB_TEST_CSV = "GT-final_test.csv"
_GTSRB_COLUMNS = ("Filename", "Roi.X1", "Roi.Y1", "Roi.X2", "Roi.Y2", "ClassId")


def _gtsrb_base(folder: Path) -> Path:
    """The folder holding Final_Training/Final_Test: `folder/GTSRB` (as unzipped) or `folder`."""
    return folder / "GTSRB" if (folder / "GTSRB").is_dir() else folder


def _find_gtsrb(folder: Path, split: str) -> list[Path] | None:
    """GTSRB ground truth: train, the per-class CSVs; test, [GT-final_test.csv, images folder]."""
    base = _gtsrb_base(folder)
    if split == "train":
        pattern = "[0-9][0-9][0-9][0-9][0-9]/GT-[0-9][0-9][0-9][0-9][0-9].csv"
        return sorted((base / "Final_Training" / "Images").glob(pattern)) or None
    images_dir = base / "Final_Test" / "Images"
    places = [images_dir, base, folder]  # the GT zip unpacks GT-final_test.csv at its top
    csv_path = next((d / _GTSRB_TEST_CSV for d in places if (d / _GTSRB_TEST_CSV).is_file()), None)
    return [csv_path, images_dir] if csv_path is not None and images_dir.is_dir() else None


def _gtsrb_cache_path(files: list[Path], split: str) -> Path:
    """Where the decoded arrays of these GTSRB files are cached: keyed by paths, sizes, times."""
    key = hashlib.sha256()
    for f in files:
        stat = f.stat()
        key.update(f"{f.resolve()}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return cache_dir() / "gtsrb" / f"decoded-{split}-{_GTSRB_SIZE}px-{key.hexdigest()[:16]}.npz"


def _read_gtsrb_csv(path: Path, images_dir: Path) -> tuple[list[Path], np.ndarray, np.ndarray]:
    """Image paths, ROI boxes (N, 4: x1, y1, x2, y2 inclusive) and class ids of one GT CSV."""
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f, delimiter=";"))
    missing = [c for c in _GTSRB_COLUMNS if rows and c not in rows[0]]
    if not rows or missing:
        raise ValueError(f"{path}: no rows or missing columns {missing}; need {_GTSRB_COLUMNS}")
    boxes = np.array([[int(r[c]) for c in _GTSRB_COLUMNS[1:5]] for r in rows], dtype=np.int64)
    labels = np.array([int(r["ClassId"]) for r in rows], dtype=np.int64)
    return [images_dir / r["Filename"] for r in rows], boxes, labels


def _decode_ppm(path: Path, box: np.ndarray) -> np.ndarray:
    """One PPM image cropped to its ROI (inclusive corners) and resized to 32x32: (32, 32, 3)."""
    from PIL import Image  # pillow comes with matplotlib; imported only when decoding GTSRB

    with Image.open(path) as im:
        rgb = im.convert("RGB")
    x1, y1, x2, y2 = (int(v) for v in box)
    crop = rgb.crop((x1, y1, min(x2 + 1, rgb.width), min(y2 + 1, rgb.height)))
    return np.asarray(crop.resize((_GTSRB_SIZE, _GTSRB_SIZE), Image.Resampling.BILINEAR))


def _read_gtsrb(files: list[Path], info: DatasetInfo, progress: bool) -> _Arrays:
    """Decode the GTSRB PPMs listed in the CSVs (cropped to the ROI, 32x32), cached as .npz."""
    split = "test" if files[0].name == _GTSRB_TEST_CSV else "train"
    cached = _gtsrb_cache_path(files, split)
    if cached.is_file():
        with np.load(cached, allow_pickle=False) as z:
            return z["images"], z["labels"]
    sources = [(files[0], files[1])] if split == "test" else [(f, f.parent) for f in files]
    parts = [_read_gtsrb_csv(csv_path, images_dir) for csv_path, images_dir in sources]
    paths = [p for part in parts for p in part[0]]
    boxes = np.concatenate([part[1] for part in parts])
    labels = np.concatenate([part[2] for part in parts])
    bar = tqdm(paths, desc=f"decoding GTSRB {split}", disable=not progress)
    pixels = [_decode_ppm(p, box) for p, box in zip(bar, boxes, strict=True)]  # file I/O
    images = np.ascontiguousarray(np.stack(pixels).transpose(0, 3, 1, 2))
    write_atomic(cached, lambda f: np.savez(f, images=images, labels=labels))
    return images, labels


_Finder = Callable[[Path, str], list[Path] | None]
_Reader = Callable[[list[Path], DatasetInfo, bool], _Arrays]
_FORMATS: dict[str, tuple[_Finder, _Reader]] = {
    "fashion-mnist": (_find_idx, _read_idx_pair),
    "mnist": (_find_idx, _read_idx_pair),
    "cifar10": (_find_cifar("cifar10"), _read_cifar),
    "cifar100": (_find_cifar("cifar100"), _read_cifar),
    "gtsrb": (_find_gtsrb, _read_gtsrb),
}


def _expected_files(name: str, split: str) -> str:
    """Human description of the files a split needs, for error messages."""
    if name in ("fashion-mnist", "mnist"):
        p = _IDX_PREFIX[split]
        return f"{p}-images-idx3-ubyte[.gz] and {p}-labels-idx1-ubyte[.gz]"
    if name in _CIFAR_FILES:
        subdir, train, test = _CIFAR_FILES[name]
        archive = REMOTES[name][0].filename
        return f"{subdir}/{{{','.join(train if split == 'train' else test)}}} or {archive}"
    if split == "train":
        return "[GTSRB/]Final_Training/Images/<5-digit class>/GT-<class>.csv + *.ppm"
    return "[GTSRB/]Final_Test/Images/*.ppm + GT-final_test.csv"


def _missing_message(name: str, split: str, folders: list[Path], error: Exception) -> str:
    """The FileNotFoundError text: every place looked at, the failed download, the fix."""
    remotes = [r for r in REMOTES[name] if split in r.splits]
    target = folders[-1]
    fix = INSTALL_COMMANDS.get(
        name, f"mkdir -p {target} && wget -P {target} {' '.join(r.url for r in remotes)}"
    )
    looked = "\n".join(f"  - {f}" for f in folders)
    return (
        f"dataset {name!r} ({split} split) not found: "
        f"looked for {_expected_files(name, split)} in\n"
        f"{looked}\n"
        f"and downloading into {target} failed: {type(error).__name__}: {error}\n"
        f"fix: {fix}"
    )


def load_dataset(
    name: str, split: str, root: str | os.PathLike[str] | None = None, *, progress: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load a split as (uint8 images (N, C, H, W), int64 labels (N,)) CPU tensors.

    Looks in `root` (if given), the system folders, then `cache_dir()/<name>`, unpacking
    official archives found there; downloads into the cache (MD5-checked) as a last resort.
    A data set that cannot be found raises FileNotFoundError listing the places and the fix.
    `progress` shows a bar while GTSRB images are decoded (once; then cached as .npz).
    """
    info = dataset_info(name)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; allowed: {list(SPLITS)}")
    find, read = _FORMATS[name]
    folders = _search_folders(name, root)
    files = None
    for folder in folders:
        if folder.is_dir():
            _unpack_archives(name, split, folder)
            files = find(folder, split)
        if files is not None:
            break
    if files is None:
        try:
            for remote in REMOTES[name]:
                if split in remote.splits:
                    _download(remote, folders[-1])
            _unpack_archives(name, split, folders[-1])
        except (OSError, ValueError, tarfile.TarError, zipfile.BadZipFile) as error:
            raise FileNotFoundError(_missing_message(name, split, folders, error)) from error
        files = find(folders[-1], split)
        if files is None:
            raise FileNotFoundError(
                _missing_message(name, split, folders, ValueError("downloaded files incomplete"))
            )
    images, labels = read(files, info, progress)
    return _to_tensors(images, labels, info, files)


def _to_tensors(
    images: np.ndarray, labels: np.ndarray, info: DatasetInfo, files: list[Path]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Check shapes and label range, and return owned (writable) torch tensors."""
    shape = (info.in_channels, info.image_size, info.image_size)
    if images.ndim != 4 or images.shape[1:] != shape or len(images) != len(labels):
        raise ValueError(
            f"{files[0]}: read images {images.shape}, labels {labels.shape}; want (N, *{shape})"
        )
    labels = labels.astype(np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= info.num_classes):
        raise ValueError(f"{files[0]}: labels outside [0, {info.num_classes - 1}]")
    return torch.from_numpy(np.array(images, dtype=np.uint8)), torch.from_numpy(labels)


# ----------------------------------------------------------------------------------------------
# Batch tools
# ----------------------------------------------------------------------------------------------


def take_subset(
    images: torch.Tensor, labels: torch.Tensor, size: int | None, seed: int, name: str = "size"
) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded, class-stratified subset of `size` samples (None: everything), in original order
    (`name`: what errors call `size`).

    Every class gets an equal share as far as possible: a class with fewer samples than its
    share gives all it has and the rest is spread over the others (the larger classes get the
    remainder of a division). The same seed gives the same subset.
    """
    n = len(labels)
    if len(images) != n:
        raise ValueError(f"images ({len(images)}) and labels ({n}) differ in length")
    if size is None:
        return images, labels
    if not 1 <= size <= n:
        raise ValueError(f"{name}={size}; must be None or in [1, {n}]")
    classes, inverse, counts = torch.unique(labels.cpu(), return_inverse=True, return_counts=True)
    alloc = torch.zeros_like(counts)
    remaining = size
    for pos, k in enumerate(torch.argsort(counts, stable=True).tolist()):  # loop over classes
        alloc[k] = min(int(counts[k]), remaining // (len(classes) - pos))
        remaining -= int(alloc[k])
    generator = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=generator)
    order = torch.argsort(inverse[perm], stable=True)  # by class, random within a class
    grouped = inverse[perm[order]]
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(n) - starts[grouped]
    chosen = torch.sort(perm[order][rank < alloc[grouped]]).values
    return images[chosen.to(images.device)], labels[chosen.to(labels.device)]


def check_uint8_images(images: torch.Tensor, name: str = "images") -> None:
    """ValueError unless `images` is a non-empty uint8 (N, C, H, W) tensor."""
    if (
        not isinstance(images, torch.Tensor)
        or images.dtype != torch.uint8
        or images.dim() != 4
        or len(images) == 0
    ):
        got = (
            f"{images.dtype} {tuple(images.shape)}"
            if isinstance(images, torch.Tensor)
            else type(images).__name__
        )
        raise ValueError(f"{name} must be non-empty uint8 (N, C, H, W); got {got}")


def check_paired_images(clean_images: torch.Tensor, triggered_images: torch.Tensor) -> None:
    """ValueError unless the two image tensors have one shape: row i of the triggered images
    is row i of the clean ones with the trigger."""
    if clean_images.shape != triggered_images.shape:
        raise ValueError(
            f"clean and triggered images must pair up row by row; got shapes "
            f"{tuple(clean_images.shape)} and {tuple(triggered_images.shape)}"
        )


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float32 in [0, 1] on the same device (what models take)."""
    if images.dtype != torch.uint8:
        raise ValueError(f"to_float expects uint8 images, got dtype {images.dtype}")
    return images.to(torch.float32).div_(255.0)


def augment(
    images_float: torch.Tensor, *, pad: int, hflip: bool, generator: torch.Generator
) -> torch.Tensor:
    """Random crop with zero padding `pad` (+ random horizontal flip) of a (N, C, H, W) batch.

    Each sample is shifted by its own offsets in [-pad, pad] (vacated pixels become 0) and,
    if `hflip`, mirrored with probability 1/2. Offsets are drawn from `generator`, so the same
    generator state gives the same result; everything else runs on the images' device as two
    gathers (rows, then columns; a flip just reverses the column index).
    """
    if images_float.ndim != 4 or not images_float.is_floating_point():
        raise ValueError(
            f"augment expects float images (N, C, H, W), got {images_float.dtype} "
            f"{tuple(images_float.shape)}"
        )
    if pad < 0:
        raise ValueError(f"pad={pad}; must be >= 0")
    if pad == 0 and not hflip:
        return images_float
    n, c, h, w = images_float.shape
    device = images_float.device
    offsets = torch.randint(0, 2 * pad + 1, (2, n), generator=generator, device=generator.device)
    flips = torch.rand(n, generator=generator, device=generator.device) < 0.5
    dy, dx = offsets.to(device)
    cols = torch.arange(w, device=device).expand(n, w)
    if hflip:
        cols = torch.where(flips.to(device)[:, None], cols.flip(1), cols)
    rows = dy[:, None] + torch.arange(h, device=device)  # (N, H) rows of the padded image
    cols = dx[:, None] + cols  # (N, W) columns of the padded image
    padded = torch.nn.functional.pad(images_float, (pad, pad, pad, pad))
    picked = padded.gather(2, rows[:, None, :, None].expand(n, c, h, w + 2 * pad))
    return picked.gather(3, cols[:, None, None, :].expand(n, c, h, w))


def iterate_batches(
    images: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int,
    *,
    shuffle: bool,
    generator: torch.Generator | None,
    drop_last: bool,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (images, labels) batches of tensors already on their device.

    With `shuffle` the order is a permutation drawn from `generator` (required then);
    `drop_last` skips a final batch smaller than `batch_size`.
    """
    n = len(images)
    if len(labels) != n:
        raise ValueError(f"images ({n}) and labels ({len(labels)}) differ in length")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}; must be >= 1")
    if shuffle and generator is None:
        raise ValueError("shuffle=True needs a torch.Generator (got generator=None)")
    order = torch.randperm(n, generator=generator) if shuffle else None
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):  # loop over batches
        if order is None:
            yield images[start : start + batch_size], labels[start : start + batch_size]
        else:
            idx = order[start : start + batch_size]
            yield images[idx.to(images.device)], labels[idx.to(labels.device)]
