"""Tests for eglib.data: every loader on small files in the real on-disk formats, batch tools."""

from __future__ import annotations

import gzip
import hashlib
import io
import tarfile
import urllib.error
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from eglib import data
from eglib.data import (
    DATASETS,
    augment,
    dataset_info,
    iterate_batches,
    load_dataset,
    take_subset,
    to_float,
)

REAL_FASHION = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(autouse=True)
def isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Every test: a private cache, no system folders, and no network (downloads fail)."""

    def offline(url: str, timeout: float = 0) -> io.BytesIO:
        raise urllib.error.URLError("network disabled in tests")

    monkeypatch.setenv("EGLIB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(data, "SYSTEM_FOLDERS", {"fashion-mnist": (tmp_path / "no-debian",)})
    monkeypatch.setattr(data.urllib.request, "urlopen", offline)


# --------------------------------------------------------------------------- format writers


def idx_bytes(array: np.ndarray) -> bytes:
    """An unsigned-byte IDX file: magic 0x0000080<ndim>, big-endian dims, the bytes."""
    header = bytes([0, 0, 8, array.ndim]) + np.array(array.shape, dtype=">u4").tobytes()
    return header + array.astype(np.uint8).tobytes()


def write_idx_split(
    folder: Path, prefix: str, n: int, seed: int, gz: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Write `<prefix>-images-idx3-ubyte[.gz]` and labels; return what was written."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n, dtype=np.uint8)
    folder.mkdir(parents=True, exist_ok=True)
    for stem, array in (
        (f"{prefix}-images-idx3-ubyte", images),
        (f"{prefix}-labels-idx1-ubyte", labels),
    ):
        raw = idx_bytes(array)
        if gz:
            (folder / f"{stem}.gz").write_bytes(gzip.compress(raw))
        else:
            (folder / stem).write_bytes(raw)
    return images, labels


def cifar_records(n: int, label_bytes: int, seed: int) -> tuple[bytes, np.ndarray, np.ndarray]:
    """`n` CIFAR binary records; returns (bytes, images (n, 3, 32, 32), the last label byte)."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)
    labels = rng.integers(0, 10 if label_bytes == 1 else 100, size=(n, label_bytes), dtype=np.uint8)
    records = np.concatenate([labels, images.reshape(n, -1)], axis=1)
    return records.tobytes(), images, labels[:, -1]


def write_cifar(folder: Path, name: str, seed: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Write the binary CIFAR files of `name` under folder/<official subfolder>."""
    label_bytes = 1 if name == "cifar10" else 2
    subdir, train_files, test_files = data._CIFAR_FILES[name]
    (folder / subdir).mkdir(parents=True)
    out = {}
    for split, files in (("train", train_files), ("test", test_files)):
        images, labels = [], []
        for i, filename in enumerate(files):
            raw, im, lab = cifar_records(3 + i, label_bytes, seed + 10 * i + len(split))
            (folder / subdir / filename).write_bytes(raw)
            images.append(im)
            labels.append(lab)
        out[split] = (np.concatenate(images), np.concatenate(labels))
    return out


# --------------------------------------------------------------------------- names


def test_dataset_table() -> None:
    assert sorted(DATASETS) == ["cifar10", "cifar100", "fashion-mnist", "gtsrb", "mnist"]
    assert dataset_info("fashion-mnist").in_channels == 1
    assert dataset_info("cifar100").num_classes == 100 and dataset_info("gtsrb").num_classes == 43
    assert [dataset_info(n).hflip for n in ("fashion-mnist", "mnist", "cifar10", "gtsrb")] == [
        True,
        False,
        True,
        False,
    ]


def test_bad_names_and_splits() -> None:
    with pytest.raises(ValueError, match=r"'foo'.*fashion-mnist"):
        load_dataset("foo", "train")
    with pytest.raises(ValueError, match=r"'bar'.*cifar10"):
        dataset_info("bar")
    with pytest.raises(ValueError, match=r"'val'.*'train', 'test'"):
        load_dataset("mnist", "val")


# --------------------------------------------------------------------------- IDX loaders


@pytest.mark.parametrize(
    ("name", "gz"), [("fashion-mnist", True), ("mnist", True), ("mnist", False)]
)
def test_idx_loaders(tmp_path: Path, name: str, gz: bool) -> None:
    root = tmp_path / "root"
    train = write_idx_split(root, "train", 7, seed=1, gz=gz)
    test = write_idx_split(root, "t10k", 4, seed=2, gz=gz)
    for split, (images, labels) in (("train", train), ("test", test)):
        x, y = load_dataset(name, split, root=root)
        assert x.shape == (len(labels), 1, 28, 28) and x.dtype == torch.uint8
        assert y.dtype == torch.int64 and x.device.type == "cpu"
        assert torch.equal(x[:, 0], torch.from_numpy(images))
        assert torch.equal(y, torch.from_numpy(labels.astype(np.int64)))


def test_idx_found_in_cache_and_bad_magic_rejected(tmp_path: Path) -> None:
    cache = tmp_path / "cache" / "mnist"
    images, _ = write_idx_split(cache, "t10k", 3, seed=3, gz=True)
    assert torch.equal(load_dataset("mnist", "test")[0][:, 0], torch.from_numpy(images))
    bad = tmp_path / "bad"
    write_idx_split(bad, "t10k", 3, seed=3, gz=False)
    raw = bytearray((bad / "t10k-images-idx3-ubyte").read_bytes())
    raw[3] = 2  # claims 2 dimensions
    (bad / "t10k-images-idx3-ubyte").write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="magic"):
        load_dataset("mnist", "test", root=bad)
    (bad / "t10k-images-idx3-ubyte").write_bytes(idx_bytes(np.zeros((3, 28, 28)))[:-5])
    with pytest.raises(ValueError, match="header says"):
        load_dataset("mnist", "test", root=bad)


@pytest.mark.skipif(
    not REAL_FASHION.is_dir(),
    reason=f"{REAL_FASHION} missing: sudo apt-get install dataset-fashion-mnist",
)
def test_real_fashion_mnist(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(data, "SYSTEM_FOLDERS", {"fashion-mnist": (REAL_FASHION,)})
    x, y = load_dataset("fashion-mnist", "train")
    assert x.shape == (60000, 1, 28, 28) and x.dtype == torch.uint8
    assert torch.equal(torch.bincount(y), torch.full((10,), 6000))
    x, y = load_dataset("fashion-mnist", "test")
    assert x.shape == (10000, 1, 28, 28)
    assert torch.equal(torch.bincount(y), torch.full((10,), 1000))
    assert y[:5].tolist() == [9, 2, 1, 1, 6]  # the documented first test labels
    assert 0 < x.float().mean() < 255


# --------------------------------------------------------------------------- CIFAR loaders


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
@pytest.mark.parametrize("as_archive", [False, True])
def test_cifar_loaders(tmp_path: Path, name: str, as_archive: bool) -> None:
    files = tmp_path / "files"
    expected = write_cifar(files, name, seed=5)
    root = tmp_path / "root"
    if as_archive:  # the official .tar.gz lying in root, unpacked on first use
        root.mkdir()
        subdir = data._CIFAR_FILES[name][0]
        with tarfile.open(root / data.REMOTES[name][0].filename, "w:gz") as tf:
            tf.add(files / subdir, arcname=subdir)
    else:
        root = files
    for split in ("train", "test"):
        x, y = load_dataset(name, split, root=root)
        images, labels = expected[split]
        assert x.shape == (len(labels), 3, 32, 32) and x.dtype == torch.uint8
        assert torch.equal(x, torch.from_numpy(images))
        assert torch.equal(y, torch.from_numpy(labels.astype(np.int64)))  # fine label for 100
    if as_archive:
        assert (root / data._CIFAR_FILES[name][0]).is_dir()
        assert not [p for p in root.iterdir() if p.name.startswith(".unpack")]


def test_cifar_archive_with_escaping_member_is_refused(tmp_path: Path) -> None:
    with tarfile.open(tmp_path / "cifar-10-binary.tar.gz", "w:gz") as tf:
        info = tarfile.TarInfo("../evil.bin")
        info.size = 3
        tf.addfile(info, io.BytesIO(b"bad"))
    with pytest.raises(tarfile.TarError):
        load_dataset("cifar10", "test", root=tmp_path)
    # unpacking happens in tmp_path/.unpack-*, so "../evil.bin" would land in tmp_path
    assert not (tmp_path / "evil.bin").exists()


def test_cifar_truncated_file_rejected(tmp_path: Path) -> None:
    write_cifar(tmp_path, "cifar10", seed=0)
    test_file = tmp_path / "cifar-10-batches-bin" / "test_batch.bin"
    test_file.write_bytes(test_file.read_bytes()[:-1])
    with pytest.raises(ValueError, match="records"):
        load_dataset("cifar10", "test", root=tmp_path)


# --------------------------------------------------------------------------- GTSRB loader

# EDGE marks the ROI's last row and column: the corners are inclusive, so they belong to the sign
BORDER, SIGN, EDGE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


def write_ppm(
    path: Path, width: int, height: int, roi: tuple[int, int, int, int], tint: int
) -> None:
    """A P6 PPM: red border, a uniform sign colour inside the inclusive ROI (x1, y1, x2, y2),
    except the ROI's last row (y2) and last column (x2), which are EDGE."""
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[:] = BORDER
    x1, y1, x2, y2 = roi
    pixels[y1 : y2 + 1, x1 : x2 + 1] = (SIGN[0], tint, SIGN[2])
    pixels[y2, x1 : x2 + 1] = EDGE
    pixels[y1 : y2 + 1, x2] = EDGE
    Image.fromarray(pixels).save(path, format="PPM")
    assert path.read_bytes()[:2] == b"P6"


def write_gt(path: Path, rows: list[tuple[str, int, int, tuple[int, int, int, int], int]]) -> None:
    """A GTSRB ground-truth CSV (semicolon separated, official header)."""
    lines = ["Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId"]
    lines += [f"{f};{w};{h};{r[0]};{r[1]};{r[2]};{r[3]};{c}" for f, w, h, r, c in rows]
    path.write_text("\n".join(lines) + "\n")


def write_gtsrb(root: Path) -> dict[str, list[tuple[int, int]]]:
    """Official GTSRB folders under root/GTSRB; per split, the (class, tint) of each image."""
    expected: dict[str, list[tuple[int, int]]] = {"train": [], "test": []}
    for cls in (0, 2, 42):
        folder = root / "GTSRB" / "Final_Training" / "Images" / f"{cls:05d}"
        folder.mkdir(parents=True)
        rows = []
        for j in range(2):
            w, h, roi, tint = 36 + j, 31 + 2 * j, (5, 6, 29 + j, 25), 5 * cls + j
            write_ppm(folder / f"{j:05d}_{j:05d}.ppm", w, h, roi, tint)
            rows.append((f"{j:05d}_{j:05d}.ppm", w, h, roi, cls))
            expected["train"].append((cls, tint))
        write_gt(folder / f"GT-{cls:05d}.csv", rows)
    test_dir = root / "GTSRB" / "Final_Test" / "Images"
    test_dir.mkdir(parents=True)
    rows = []
    for j, cls in enumerate((7, 3, 7)):
        write_ppm(test_dir / f"{j:05d}.ppm", 40, 34, (6, 5, 33, 28), 100 + j)
        rows.append((f"{j:05d}.ppm", 40, 34, (6, 5, 33, 28), cls))
        expected["test"].append((cls, 100 + j))
    write_gt(root / "GT-final_test.csv", rows)  # where the official GT zip unpacks it
    return expected


def check_gtsrb(x: torch.Tensor, y: torch.Tensor, expected: list[tuple[int, int]]) -> None:
    """Images are the ROI only (sign colour, no border; the ROI's last row and column, EDGE,
    upscaled to the last row and column), 32x32, labels in order."""
    assert x.shape == (len(expected), 3, 32, 32) and x.dtype == torch.uint8
    assert y.tolist() == [cls for cls, _ in expected]
    edge = torch.tensor(EDGE, dtype=torch.uint8)[:, None]
    for i, (_, tint) in enumerate(expected):
        colour = torch.tensor([SIGN[0], tint, SIGN[2]], dtype=torch.uint8)
        inner = x[i, :, :30, :30]  # rows/columns 30 blend the sign with its edge
        assert torch.equal(inner, colour[:, None, None].expand_as(inner)), f"image {i} not its ROI"
        assert torch.equal(x[i, :, -1, :], edge.expand(3, 32)), f"image {i} lost the ROI's y2 row"
        assert torch.equal(x[i, :, :, -1], edge.expand(3, 32)), f"image {i} lost the ROI's x2 col"


def test_gtsrb_loader_and_npz_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    expected = write_gtsrb(tmp_path / "root")
    for split in ("train", "test"):
        check_gtsrb(
            *load_dataset("gtsrb", split, root=tmp_path / "root", progress=False), expected[split]
        )
    cached = sorted((tmp_path / "cache" / "gtsrb").glob("decoded-*.npz"))
    assert len(cached) == 2

    def no_decoding(path: Path, box: np.ndarray) -> np.ndarray:
        raise AssertionError("cached arrays should have been used")

    monkeypatch.setattr(data, "_decode_ppm", no_decoding)
    for split in ("train", "test"):
        check_gtsrb(
            *load_dataset("gtsrb", split, root=tmp_path / "root", progress=False), expected[split]
        )


def test_gtsrb_from_official_zips(tmp_path: Path) -> None:
    expected = write_gtsrb(tmp_path / "src")
    root = tmp_path / "root"
    root.mkdir()
    with zipfile.ZipFile(root / "GTSRB_Final_Test_Images.zip", "w") as zf:
        for ppm in sorted((tmp_path / "src" / "GTSRB" / "Final_Test" / "Images").iterdir()):
            zf.write(ppm, f"GTSRB/Final_Test/Images/{ppm.name}")
    with zipfile.ZipFile(root / "GTSRB_Final_Test_GT.zip", "w") as zf:
        zf.write(tmp_path / "src" / "GT-final_test.csv", "GT-final_test.csv")
    check_gtsrb(*load_dataset("gtsrb", "test", root=root, progress=False), expected["test"])
    with pytest.raises(FileNotFoundError, match="GTSRB_Final_Training_Images.zip"):
        load_dataset("gtsrb", "train", root=root)


# --------------------------------------------------------------------------- missing / download


def test_missing_fashion_mnist_lists_places_and_fix(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as err:
        load_dataset("fashion-mnist", "train", root=tmp_path / "mine")
    message = str(err.value)
    for place in (tmp_path / "mine", tmp_path / "no-debian", tmp_path / "cache" / "fashion-mnist"):
        assert f"- {place}\n" in message
    assert "train-images-idx3-ubyte" in message and "network disabled" in message
    assert "sudo apt-get install dataset-fashion-mnist" in message


@pytest.mark.parametrize("name", ["mnist", "cifar10", "cifar100", "gtsrb"])
def test_missing_other_datasets_name_the_files(name: str, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as err:
        load_dataset(name, "test")
    message = str(err.value)
    target = tmp_path / "cache" / name
    assert f"- {target}\n" in message and f"wget -P {target}" in message
    assert all(r.url in message for r in data.REMOTES[name] if "test" in r.splits)


def test_download_checks_md5(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    served = {
        "t10k-images-idx3-ubyte.gz": gzip.compress(idx_bytes(np.full((2, 28, 28), 9))),
        "t10k-labels-idx1-ubyte.gz": gzip.compress(idx_bytes(np.array([4, 1]))),
    }
    monkeypatch.setattr(
        data.urllib.request,
        "urlopen",
        lambda url, timeout=0: io.BytesIO(served[url.rsplit("/", 1)[1]]),
    )
    with pytest.raises(FileNotFoundError, match="checksum mismatch"):
        load_dataset("mnist", "test")
    cache = tmp_path / "cache" / "mnist"
    assert not [p.name for p in cache.iterdir()]  # nothing half-written left behind
    remotes = tuple(
        data._Remote(r.url, hashlib.md5(served[r.filename]).hexdigest(), r.splits)
        for r in data.REMOTES["mnist"]
        if r.filename in served
    )
    monkeypatch.setitem(data.REMOTES, "mnist", remotes)
    x, y = load_dataset("mnist", "test")
    assert x.shape == (2, 1, 28, 28) and bool((x == 9).all()) and y.tolist() == [4, 1]
    assert sorted(p.name for p in cache.iterdir()) == sorted(served)


# --------------------------------------------------------------------------- take_subset


def labelled(counts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Images whose pixel encodes their row (to check pairing) and labels with these counts."""
    labels = torch.cat([torch.full((c,), k) for k, c in enumerate(counts)])
    labels = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))]
    rows = torch.arange(len(labels))
    images = torch.stack([rows % 256, rows // 256], 1).to(torch.uint8)[:, :, None, None]
    return images, labels


def test_take_subset_stratified_and_deterministic() -> None:
    images, labels = labelled([50, 40, 6, 30])
    sub_x, sub_y = take_subset(images, labels, 40, seed=3)
    # class 2 gives all its 6; the other 34 split 11/11/12, the largest class taking the extra
    assert torch.bincount(sub_y, minlength=4).tolist() == [12, 11, 6, 11]
    rows = sub_x[:, 0, 0, 0].long() + 256 * sub_x[:, 1, 0, 0].long()
    assert torch.equal(labels[rows], sub_y)  # images and labels stay paired
    assert bool((rows[1:] > rows[:-1]).all())  # original order, no repeats
    again = take_subset(images, labels, 40, seed=3)
    assert torch.equal(again[0], sub_x) and torch.equal(again[1], sub_y)
    assert not torch.equal(take_subset(images, labels, 40, seed=4)[0], sub_x)
    _, equal_y = take_subset(images, labels, 20, seed=0)
    assert torch.bincount(equal_y).tolist() == [5, 5, 5, 5]
    assert take_subset(images, labels, None, seed=0)[0] is images
    with pytest.raises(ValueError, match="size=500"):
        take_subset(images, labels, 500, seed=0)


# --------------------------------------------------------------------------- to_float / augment


def test_to_float() -> None:
    x = torch.tensor([[[[0, 51, 255]]]], dtype=torch.uint8)
    y = to_float(x)
    assert y.dtype == torch.float32 and torch.allclose(y, torch.tensor([[[[0.0, 0.2, 1.0]]]]))
    with pytest.raises(ValueError, match="uint8"):
        to_float(y)


def shifted(image: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """`image` (C, H, W) moved by (dy, dx) pixels with zeros filling in."""
    c, h, w = image.shape
    out = torch.zeros_like(image)
    out[:, max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = image[
        :, max(-dy, 0) : h + min(-dy, 0), max(-dx, 0) : w + min(-dx, 0)
    ]
    return out


def which_shift(out: torch.Tensor, image: torch.Tensor, pad: int) -> tuple[int, int] | None:
    """The shift (dy, dx) with |dy|, |dx| <= pad that turns `image` into `out`, if any."""
    for dy in range(-pad, pad + 1):
        for dx in range(-pad, pad + 1):
            if torch.equal(out, shifted(image, dy, dx)):
                return dy, dx
    return None


def test_augment_shape_determinism_identity() -> None:
    x = torch.rand(16, 3, 32, 32)
    a = augment(x, pad=4, hflip=True, generator=torch.Generator().manual_seed(1))
    b = augment(x, pad=4, hflip=True, generator=torch.Generator().manual_seed(1))
    c = augment(x, pad=4, hflip=True, generator=torch.Generator().manual_seed(2))
    assert a.shape == x.shape and a.dtype == x.dtype and a.device == x.device
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(augment(x, pad=0, hflip=False, generator=torch.Generator()), x)
    with pytest.raises(ValueError, match="pad=-1"):
        augment(x, pad=-1, hflip=False, generator=torch.Generator())
    with pytest.raises(ValueError, match="float"):
        augment(x.to(torch.uint8), pad=1, hflip=False, generator=torch.Generator())


def test_augment_crops_are_real_shifts() -> None:
    image = torch.arange(1, 2 * 7 * 9 + 1, dtype=torch.float32).reshape(2, 7, 9)  # all distinct
    batch = image.expand(64, -1, -1, -1).contiguous()
    out = augment(batch, pad=2, hflip=False, generator=torch.Generator().manual_seed(0))
    shifts = [which_shift(o, image, 2) for o in out]
    assert None not in shifts
    assert len(set(shifts)) > 10  # per-sample offsets, not one for the batch


def test_augment_flip_flips() -> None:
    image = torch.rand(1, 5, 6)
    out = augment(
        image.expand(64, -1, -1, -1), pad=0, hflip=True, generator=torch.Generator().manual_seed(0)
    )
    flipped = [bool(torch.equal(o, image.flip(-1))) for o in out]
    assert all(f or torch.equal(o, image) for f, o in zip(flipped, out, strict=True))
    assert 10 < sum(flipped) < 54
    both = augment(
        image.expand(64, -1, -1, -1), pad=1, hflip=True, generator=torch.Generator().manual_seed(0)
    )
    assert all(which_shift(o, image, 1) or which_shift(o, image.flip(-1), 1) for o in both)


# --------------------------------------------------------------------------- iterate_batches


def test_iterate_batches_covers_once_and_drop_last() -> None:
    images = torch.arange(10).reshape(10, 1, 1, 1)
    labels = torch.arange(10) * 2
    g = torch.Generator().manual_seed(0)
    batches = list(iterate_batches(images, labels, 3, shuffle=True, generator=g, drop_last=False))
    assert [len(b[0]) for b in batches] == [3, 3, 3, 1]
    seen = torch.cat([b[0].flatten() for b in batches])
    assert sorted(seen.tolist()) == list(range(10)) and seen.tolist() != list(range(10))
    assert all(torch.equal(b[1], b[0].flatten() * 2) for b in batches)
    dropped = list(iterate_batches(images, labels, 3, shuffle=True, generator=g, drop_last=True))
    assert [len(b[0]) for b in dropped] == [3, 3, 3]
    assert len(set(torch.cat([b[0].flatten() for b in dropped]).tolist())) == 9
    plain = list(iterate_batches(images, labels, 4, shuffle=False, generator=None, drop_last=False))
    assert [b[0].flatten().tolist() for b in plain] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    with pytest.raises(ValueError, match="generator"):
        next(iterate_batches(images, labels, 3, shuffle=True, generator=None, drop_last=False))
    with pytest.raises(ValueError, match="batch_size=0"):
        next(iterate_batches(images, labels, 0, shuffle=False, generator=None, drop_last=False))
