"""Real training data for `search`: Fashion-MNIST IDX, CIFAR-10 python batches and ImageFolder, adapted to the model.

`open_dataset(spec, input_shape=...)` reads a dataset folder (or a known name such as `fashion-mnist`) and returns
`Splits`: `.train` for training, `.search` (a held-out part of the training data) for the sub-net search, and
`.test` (the dataset's official test split) for validation. Each yields `(float image C×H×W, int label)` already
shaped for the model: resized (bilinear), channels repeated (1→3) or averaged (3→1), normalised. Every adaptation
leaves a line in `.notes`. Images stay as stored (uint8, or files on disk) and are adapted per item or per batch,
so a 224×224 float copy of the whole set never exists.

    splits = open_dataset("fashion-mnist", input_shape=(1, 3, 32, 32), train_limit=2000)
    for images, labels in loader(splits.train, 128, shuffle=True, seed=0, epoch=3):
        ...

Formats, recognised by their files (a folder may hold only one):
  * IDX (MNIST family): `train-images-idx3-ubyte`, `train-labels-idx1-ubyte`, `t10k-images-idx3-ubyte`,
    `t10k-labels-idx1-ubyte`, each gzipped (`.gz`) or not; Debian's `dataset-fashion-mnist` installs them.
  * CIFAR-10 "python version": `data_batch_1` … `data_batch_5`, `test_batch`, `batches.meta` (optional, class
    names). These are pickles, and loading a pickle can run any code; they are read with a restricted
    unpickler that builds only plain containers and numpy arrays and refuses any other global, before it
    is called. The result is then checked to be exactly a CIFAR batch (uint8 data, integer labels).
  * ImageFolder: `train/` and `val/` (or `test/`) folders of class subfolders of images, or class subfolders
    alone (then a fixed 10% of each class's images is held out as the test split). Decoding needs Pillow.

Normalisation: IDX and CIFAR use the mean and std of their own training split (computed once, exactly; after the
channel change, so a 3→1 average gets its own statistics); ImageFolder uses the ImageNet constants that
pretrained models expect. Randomness: `seed` picks the search split and the `train_limit` subset; the
`val_limit` subset and ImageFolder's held-out test split use fixed seeds, so every seed and every method is
validated on the same images. Subsets are prefixes of one permutation: a smaller limit is a subset of a larger.
"""

from __future__ import annotations

import gzip
import logging
import math
import os
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler

from dyncompile.errors import ConfigError, DatasetError

__all__ = [
    "DatasetError",
    "DatasetInfo",
    "InputAdapter",
    "Splits",
    "StoredImages",
    "ImageFiles",
    "KNOWN_DATASETS",
    "open_dataset",
    "read_idx",
    "loader",
]

log = logging.getLogger(__name__)


# Known names for `--data`: datasets a system package installs, never downloaded at run time.
KNOWN_DATASETS: dict[str, tuple[Path, str]] = {
    "fashion-mnist": (Path("/usr/share/datasets/fashion-mnist"), "apt-get install dataset-fashion-mnist"),
}

FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".webp", ".tif", ".tiff"})
IMAGEFOLDER_TEST_FRACTION = 0.1
_VAL_SUBSET_SEED = 0x5EED_7E57  # fixed: every run is validated on the same val_limit subset
_HOLDOUT_SEED = 0x5EED_0117  # fixed: ImageFolder's held-out test split does not move with --seed

_FORMATS_HELP = ("IDX files (train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], t10k-images-idx3-ubyte[.gz], "
                 "t10k-labels-idx1-ubyte[.gz]), a CIFAR-10 python folder (data_batch_1..5, test_batch, batches.meta), "
                 "or an ImageFolder (train/ and val/ of class subfolders of .jpg/.png images, or class subfolders alone)")


# ----------------------------------------------------------------------------------------------------- records


@dataclass
class DatasetInfo:
    """What a dataset folder holds, before any adaptation to a model."""

    name: str  # "fashion-mnist", "cifar-10", or the folder's name
    format: str  # "idx" | "cifar10-python" | "imagefolder"
    path: Path
    num_classes: int
    classes: list[str]
    input_shape: tuple[int | None, ...]  # C, H, W as stored; H, W are None when images vary in size
    train_size: int
    test_size: int
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"name": self.name, "format": self.format, "path": str(self.path), "num_classes": self.num_classes,
                "classes": list(self.classes), "input_shape": list(self.input_shape), "train_size": self.train_size,
                "test_size": self.test_size, "notes": list(self.notes)}


@dataclass(frozen=True)
class InputAdapter:
    """Turns stored uint8 images (N, C_stored, h, w) into model inputs (N, C, H, W), float, normalised.

    Order: 3→1 channel average (before resizing: a third of the work), resize so the image covers H×W keeping its
    aspect ratio (bilinear; antialiased when shrinking) and crop the centre, normalise, 1→3 channel repeat.
    `mean`/`std` are per model channel on the 0..1 scale.
    """

    stored_channels: int
    channels: int
    height: int
    width: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(torch.float32, copy=True)  # a fresh tensor: the steps below work in place
        if self.stored_channels == 3 and self.channels == 1:
            x = x.mean(dim=1, keepdim=True)
        x = _cover_resize(x, self.height, self.width)
        mean = torch.tensor(self.mean[: x.shape[1]], dtype=x.dtype).view(1, -1, 1, 1) * 255.0
        std = torch.tensor(self.std[: x.shape[1]], dtype=x.dtype).view(1, -1, 1, 1) * 255.0
        x = x.sub_(mean).div_(std)
        if self.stored_channels == 1 and self.channels == 3:
            return x.repeat(1, 3, 1, 1)
        return x.contiguous()

    def to_json(self) -> dict:
        return {"stored_channels": self.stored_channels, "input_shape": [1, self.channels, self.height, self.width],
                "mean": list(self.mean), "std": list(self.std)}


def _cover_resize(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    if (h, w) == (height, width):
        return x
    scale = max(height / h, width / w)
    size = (max(height, round(h * scale)), max(width, round(w * scale)))
    x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=scale < 1)
    top, left = (size[0] - height) // 2, (size[1] - width) // 2
    return x[..., top: top + height, left: left + width]


class _AdaptedSubset(Dataset):
    """A subset (by `indices`) of one stored split; `batch` builds whole model-ready batches.

    `loader` fetches through `batch`, so a batch is adapted in one call and never re-stacked from items (on a
    224×224 input the stacking alone costs more than the resize). Any other DataLoader works through
    `__getitem__`.
    """

    def __init__(self, labels: torch.Tensor, indices: torch.Tensor, adapter: InputAdapter):
        self.all_labels, self.indices, self.adapter = labels, indices, adapter

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def labels(self) -> torch.Tensor:
        """The labels of this subset, in order (int64)."""
        return self.all_labels[self.indices]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        images, labels = self.batch([i])
        return images[0], int(labels[0])

    def batch(self, items: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (N, C, H, W) float, adapted to the model, and labels (N,) int64 of these subset positions."""
        rows = self.indices[torch.as_tensor(list(items), dtype=torch.long)]
        return self.adapter(self._stored(rows)), self.all_labels[rows]

    def _stored(self, rows: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class StoredImages(_AdaptedSubset):
    """A subset of in-memory uint8 images (N, C, H, W), resized and normalised per batch."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor, adapter: InputAdapter):
        super().__init__(labels, indices, adapter)
        self.images = images

    def _stored(self, rows: torch.Tensor) -> torch.Tensor:
        return self.images[rows]


class ImageFiles(_AdaptedSubset):
    """A subset of image files on disk, decoded with Pillow straight to the model's H×W, normalised per batch."""

    def __init__(self, files: Sequence[str], labels: torch.Tensor, indices: torch.Tensor, adapter: InputAdapter):
        super().__init__(labels, indices, adapter)
        self.files = files

    def _stored(self, rows: torch.Tensor) -> torch.Tensor:
        return torch.stack([_decode_image(self.files[j], self.adapter.height, self.adapter.width) for j in rows.tolist()])


@dataclass
class Splits:
    """The three splits of one dataset, adapted to one model input shape."""

    info: DatasetInfo
    train: Dataset
    search: Dataset
    test: Dataset
    adapter: InputAdapter
    notes: list[str]  # the dataset's notes, then every adaptation and subset, one line each

    @property
    def num_classes(self) -> int:
        return self.info.num_classes


# ------------------------------------------------------------------------------------------------- public API


def open_dataset(spec: str | os.PathLike, *, input_shape: Sequence[int], train_limit: int | None = None,
                 val_limit: int | None = None, search_fraction: float = 0.1, search_limit: int | None = None,
                 seed: int = 0, normalize: bool = True) -> Splits:
    """Open `spec` (a folder, or a name in KNOWN_DATASETS) and adapt it to `input_shape` ((1,)C,H,W of the model).

    The search split is `search_fraction` of the training split, drawn with `seed`; `.train` is the rest, cut to
    `train_limit`. `search_limit` caps the search split; left None with a `train_limit`, it keeps the full data's
    ratio (search = train_limit * f / (1 - f)). `.test` is the official test split, cut to `val_limit`.
    Raises ConfigError for a bad argument or a model the data cannot feed, DatasetError for unreadable data.
    """
    channels, height, width = _model_chw(input_shape)
    if not 0.0 <= search_fraction < 1.0:
        raise ConfigError(f"search fraction must be in [0, 1), got {search_fraction}")
    for name, value in (("train limit", train_limit), ("val limit", val_limit), ("search limit", search_limit)):
        if value is not None and value < 1:
            raise ConfigError(f"{name} must be a positive number of images, got {value}")
    path, known = _resolve(spec)
    raw = _read_folder(path, known)
    info = raw.info
    stored_c = info.input_shape[0]
    if channels != stored_c and {channels, stored_c} != {1, 3}:
        raise ConfigError(f"the model takes {channels} input channels but {info.name} images have {stored_c}; "
                          f"dyncompile adapts only 1↔3 channels: convert the model with --input-shape 1,{stored_c},H,W")
    notes = list(info.notes)
    mean, std, stats_note = raw.stats(channels) if normalize else ((0.0,) * channels, (1.0,) * channels, None)
    mean, std = tuple(mean) * (channels // len(mean)), tuple(std) * (channels // len(std))
    adapter = InputAdapter(stored_c, channels, height, width, mean, std)
    notes += _adaptation_notes(info, adapter)
    notes.append(stats_note or "not normalised (pixels scaled to 0..1)")

    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(info.train_size, generator=generator)
    n_search = max(1, round(info.train_size * search_fraction)) if search_fraction > 0 else 0
    if info.train_size - n_search < 1:
        raise ConfigError(f"{info.name} has only {info.train_size} training images: too few to hold out a search split")
    search_idx, train_idx = order[:n_search], order[n_search:]
    if train_limit is not None:
        if search_limit is None and n_search:
            search_limit = math.ceil(train_limit * search_fraction / (1 - search_fraction))
        train_idx = _limit(train_idx, train_limit, "train limit", notes)
    if search_limit is not None and n_search:
        search_idx = _limit(search_idx, search_limit, "search limit", notes)
    test_idx = torch.arange(info.test_size)
    if val_limit is not None:
        test_idx = _limit(torch.randperm(info.test_size, generator=torch.Generator().manual_seed(_VAL_SUBSET_SEED)),
                          val_limit, "val limit", notes)
    notes.append(f"splits: train {len(train_idx)}, search {len(search_idx)} (held out of the training split, "
                 f"seed {seed}), test {len(test_idx)}")
    for note in notes:
        log.info("%s: %s", info.name, note)
    return Splits(info, raw.make(raw.train, train_idx, adapter), raw.make(raw.train, search_idx, adapter),
                  raw.make(raw.test, test_idx, adapter), adapter, notes)


def loader(dataset: Dataset, batch_size: int, *, shuffle: bool, seed: int = 0, epoch: int = 0,
           drop_last: bool = False, start_batch: int = 0, rank: int = 0, world_size: int = 1) -> DataLoader:
    """A single-process DataLoader whose order is a function of (seed, epoch) only, not of history.

    Build one per epoch: `--resume` then sees the same batches as an uninterrupted run, and `start_batch` skips
    the batches an interrupted epoch already did without loading them. With `world_size` > 1, each rank gets
    every world_size-th sample of the same order, padded by wrapping so all ranks have as many batches (DDP).
    """
    if batch_size < 1:
        raise ConfigError(f"batch size must be positive, got {batch_size}")
    if not 0 <= rank < world_size:
        raise ConfigError(f"rank {rank} is outside a world of {world_size} processes")
    order = _epoch_order(len(dataset), shuffle=shuffle, seed=seed, epoch=epoch, rank=rank, world_size=world_size)
    order = order[start_batch * batch_size:]
    if isinstance(dataset, _AdaptedSubset):
        batches = _Batches(order, batch_size, drop_last)
        return DataLoader(_BatchFetch(dataset), sampler=batches, batch_size=None, num_workers=0)
    return DataLoader(dataset, batch_size=batch_size, sampler=order, drop_last=drop_last, num_workers=0)


def _epoch_order(n: int, *, shuffle: bool, seed: int, epoch: int, rank: int, world_size: int) -> list[int]:
    if shuffle:
        epoch_seed = int(np.random.SeedSequence([seed, epoch]).generate_state(1, dtype=np.uint64)[0])
        order = torch.randperm(n, generator=torch.Generator().manual_seed(epoch_seed))
    else:
        order = torch.arange(n)
    if world_size > 1 and n:  # pad by wrapping, as DistributedSampler does, so every rank has as many batches
        total = math.ceil(n / world_size) * world_size
        order = torch.cat([order, order[: total - n]])[rank::world_size]
    return order.tolist()


class _Batches(Sampler[list[int]]):
    def __init__(self, order: list[int], batch_size: int, drop_last: bool):
        stop = len(order) - len(order) % batch_size if drop_last else len(order)
        self.batches = [order[i: i + batch_size] for i in range(0, stop, batch_size)]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class _BatchFetch(Dataset):
    def __init__(self, dataset: _AdaptedSubset):
        self.dataset = dataset

    def __getitem__(self, items: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.dataset.batch(items)


# --------------------------------------------------------------------------------------------- spec and detection


def _model_chw(input_shape: Sequence[int]) -> tuple[int, int, int]:
    shape = tuple(input_shape)
    if len(shape) == 4:
        shape = shape[1:]
    if len(shape) != 3 or not all(isinstance(s, int) and s > 0 for s in shape):
        raise ConfigError(f"input shape must be (1,)C,H,W of positive integers, got {tuple(input_shape)}")
    return shape  # type: ignore[return-value]


def _resolve(spec: str | os.PathLike) -> tuple[Path, str | None]:
    text = os.fspath(spec)
    if text in KNOWN_DATASETS:
        path, install = KNOWN_DATASETS[text]
        if not path.is_dir():
            raise ConfigError(f"{text} is not installed at {path}: {install}, or pass --data PATH to a copy")
        return path, text
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ConfigError(f"'{path}' is a file; pass the folder that holds the dataset "
                              f"(extract an archive first, e.g. tar xzf cifar-10-python.tar.gz)")
        return path, None
    if os.sep not in text and not text.startswith((".", "~")):
        raise ConfigError(f"unknown dataset '{text}' (no such folder either); known names: "
                          f"{', '.join(sorted(KNOWN_DATASETS))}; or pass a dataset folder")
    raise ConfigError(f"dataset folder '{path}' does not exist; pass a folder or one of: {', '.join(sorted(KNOWN_DATASETS))}")


@dataclass
class _Raw:
    """A dataset as read from disk: per split, stored uint8 images or file paths, and int64 labels."""

    info: DatasetInfo
    train: tuple[object, torch.Tensor]
    test: tuple[object, torch.Tensor]
    make: Callable[[tuple[object, torch.Tensor], torch.Tensor, InputAdapter], Dataset]
    stats: Callable[[int], tuple[tuple[float, ...], tuple[float, ...], str]]


def _read_folder(path: Path, known: str | None) -> _Raw:
    try:
        names = {entry.name for entry in os.scandir(path)}
    except OSError as exc:
        raise DatasetError(f"cannot read dataset folder '{path}' ({exc.strerror}); check its permissions") from None
    for detect, read in _FORMATS:
        if detect(path, names):
            return read(path, names, known)
    shown = ", ".join(sorted(names)[:6]) + (", …" if len(names) > 6 else "") if names else "nothing"
    raise DatasetError(f"'{path}' is not a dataset folder dyncompile reads (it holds {shown}); expected {_FORMATS_HELP}")


def _limit(indices: torch.Tensor, limit: int, what: str, notes: list[str]) -> torch.Tensor:
    if limit >= len(indices):
        if limit > len(indices):
            notes.append(f"{what} {limit} exceeds the {len(indices)} images available: using all of them")
        return indices
    return indices[:limit]


def _adaptation_notes(info: DatasetInfo, adapter: InputAdapter) -> list[str]:
    notes = []
    c, h, w = info.input_shape
    if (h, w) != (adapter.height, adapter.width):
        stored = f"{h}×{w}" if h is not None else "each image"
        how = "bilinear" if h is not None and h / w == adapter.height / adapter.width else \
            "bilinear, shorter side to fit, centre crop"
        notes.append(f"resized {stored} → {adapter.height}×{adapter.width} ({how}) for the model's input")
    if c == 1 and adapter.channels == 3:
        notes.append("grayscale repeated to 3 channels (the model takes 3)")
    elif c == 3 and adapter.channels == 1:
        notes.append("RGB averaged to 1 channel (the model takes 1)")
    return notes


def _in_memory_stats(images: torch.Tensor, channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Exact per-channel mean and std (0..1 scale) of uint8 images after the 1↔3 channel change (via histograms)."""
    if channels == 1 and images.shape[1] == 3:
        planes, top = [images.sum(dim=1, dtype=torch.int16)], 3 * 255  # grey = (r + g + b) / 3
    else:
        planes, top = [images[:, c] for c in range(images.shape[1])], 255
    means, stds = [], []
    for plane in planes:
        counts = torch.bincount(plane.flatten(), minlength=top + 1).double()
        values = torch.arange(top + 1, dtype=torch.float64) / top
        mean = float((counts * values).sum() / counts.sum())
        var = float((counts * (values - mean) ** 2).sum() / counts.sum())
        means.append(round(mean, 4))
        stds.append(round(max(var, 1e-12) ** 0.5, 4))
    return tuple(means), tuple(stds)


def _stored_raw(info: DatasetInfo, train: tuple[torch.Tensor, torch.Tensor], test: tuple[torch.Tensor, torch.Tensor]) -> _Raw:
    def stats(channels: int):
        mean, std = _in_memory_stats(train[0], channels)
        fmt = lambda v: ", ".join(f"{x:.4f}" for x in v)  # noqa: E731
        return mean, std, f"normalised with the training split's mean ({fmt(mean)}) and std ({fmt(std)})"

    return _Raw(info, train, test, lambda split, idx, adapter: StoredImages(split[0], split[1], idx, adapter), stats)


def _check_labels(labels: torch.Tensor, images: int, where: str, num_classes: int | None = None) -> None:
    if len(labels) != images:
        raise DatasetError(f"{where}: {images} images but {len(labels)} labels; the files do not belong together "
                           f"(re-extract the dataset)")
    if len(labels) and (int(labels.min()) < 0 or (num_classes is not None and int(labels.max()) >= num_classes)):
        raise DatasetError(f"{where}: labels outside 0..{(num_classes or 1) - 1}; the file is corrupt (re-extract the dataset)")


# ---------------------------------------------------------------------------------------------------------- IDX

_IDX_NAME = re.compile(r"^(train|t10k)-(images|labels)[-.]idx([13])-ubyte(\.gz)?$")
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def _idx_files(names: set[str]) -> dict[tuple[str, str], str]:
    found = {}
    for name in sorted(names):
        m = _IDX_NAME.match(name)
        if m and (m[2] == "images") == (m[3] == "3"):
            found.setdefault((m[1], m[2]), name)
    return found


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """Read one IDX file (gzipped or not; detected by content) holding `ndim` dimensions of unsigned bytes."""
    try:
        with open(path, "rb") as f:
            data = f.read()
        if data[:2] == b"\x1f\x8b":
            data = gzip.decompress(data)
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DatasetError(f"'{path}' is truncated or corrupt ({exc}); re-install or re-download it") from None
    if len(data) < 4 or data[:2] != b"\x00\x00" or data[2] not in _IDX_DTYPES:
        raise DatasetError(f"'{path}' is not an IDX file (bad magic number {data[:4].hex() or 'empty'}); "
                           f"re-install or re-download it")
    if data[2] != 0x08 or data[3] != ndim:
        raise DatasetError(f"'{path}' holds {data[3]}-d IDX type 0x{data[2]:02x}, expected {ndim}-d unsigned bytes "
                           f"(0x08) as in MNIST-family datasets")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DatasetError(f"'{path}' is truncated (header cut short); re-install or re-download it")
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = header + math.prod(dims)
    if len(data) != expected:
        raise DatasetError(f"'{path}' has {len(data)} bytes but its header {dims} needs {expected}: truncated or "
                           f"corrupt; re-install or re-download it")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def _detect_idx(path: Path, names: set[str]) -> bool:
    return bool(_idx_files(names))


def _read_idx_folder(path: Path, names: set[str], known: str | None) -> _Raw:
    files = _idx_files(names)
    missing = [f"{s}-{k}-idx{3 if k == 'images' else 1}-ubyte[.gz]" for s in ("train", "t10k")
               for k in ("images", "labels") if (s, k) not in files]
    if missing:
        raise DatasetError(f"'{path}' holds IDX files but lacks {', '.join(missing)}; re-install or re-extract the dataset")
    splits = {}
    for split in ("train", "t10k"):
        images = read_idx(path / files[split, "images"], 3)
        labels = torch.from_numpy(read_idx(path / files[split, "labels"], 1).astype(np.int64))
        _check_labels(labels, len(images), f"'{path / files[split, 'labels']}'")
        splits[split] = (torch.from_numpy(images.copy()).unsqueeze(1), labels)
    if splits["train"][0].shape[2:] != splits["t10k"][0].shape[2:]:
        raise DatasetError(f"'{path}': train and t10k images differ in size; the files do not belong together")
    num_classes = int(max(splits["train"][1].max(), splits["t10k"][1].max())) + 1
    is_fashion = known == "fashion-mnist" or "fashion" in path.name.lower()
    name = "fashion-mnist" if is_fashion else (known or path.name)
    classes = list(FASHION_MNIST_CLASSES) if is_fashion and num_classes == 10 else [str(i) for i in range(num_classes)]
    _, h, w = splits["train"][0].shape[1:]
    info = DatasetInfo(name, "idx", path, num_classes, classes, (1, h, w), len(splits["train"][1]),
                       len(splits["t10k"][1]), [f"read IDX files from {path} ({name})"])
    return _stored_raw(info, splits["train"], splits["t10k"])


# ----------------------------------------------------------------------------------------------------- CIFAR-10

_CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))


def _numpy_core(module: str):
    import importlib

    for prefix in ("numpy._core.", "numpy.core."):  # numpy ≥ 2, then 1.x
        try:
            return importlib.import_module(prefix + module)
        except ImportError:
            continue
    raise ImportError(module)


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    # Python 3 pickles bytes at protocol < 3 as _codecs.encode(text, "latin1"); no other codec is let through.
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise pickle.UnpicklingError(f"_codecs.encode with {encoding!r}")
    return text.encode("latin1")


def _safe_globals() -> dict[tuple[str, str], object]:
    multiarray, numeric = _numpy_core("multiarray"), _numpy_core("numeric")
    allowed: dict[tuple[str, str], object] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_encode,
        ("builtins", "set"): set, ("builtins", "frozenset"): frozenset,
        ("builtins", "bytearray"): bytearray, ("builtins", "complex"): complex,
        ("collections", "OrderedDict"): __import__("collections").OrderedDict,
    }
    for prefix in ("numpy.core", "numpy._core"):  # the module name depends on the numpy that wrote the file
        allowed[prefix + ".multiarray", "_reconstruct"] = multiarray._reconstruct
        allowed[prefix + ".multiarray", "scalar"] = multiarray.scalar
        allowed[prefix + ".numeric", "_frombuffer"] = numeric._frombuffer
    return allowed


class _ArrayUnpickler(pickle.Unpickler):
    """Builds only plain containers, numbers, strings and numpy arrays; refuses any other global before calling it."""

    def __init__(self, file, source: Path):
        super().__init__(file, encoding="latin1")  # CIFAR-10's files are Python 2 pickles
        self.source = source
        self.allowed = _safe_globals()

    def find_class(self, module: str, name: str):
        try:
            return self.allowed[module, name]
        except KeyError:
            raise DatasetError(f"'{self.source}' references {module}.{name}, which a CIFAR-10 batch never holds; "
                               f"refused to load it (unpickling runs code): re-extract the official archive") from None

    def persistent_load(self, pid):
        raise DatasetError(f"'{self.source}' uses pickle persistent ids; refused: re-extract the official archive")


def _unpickle_dict(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            obj = _ArrayUnpickler(f, path).load()
    except DatasetError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure of a data file is one line
        raise DatasetError(f"'{path}' is truncated or corrupt ({type(exc).__name__}: {exc}); re-extract the dataset") from None
    if not isinstance(obj, dict):
        raise DatasetError(f"'{path}' holds a {type(obj).__name__}, not a CIFAR-10 batch dict; re-extract the dataset")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _read_cifar_batch(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    batch = _unpickle_dict(path)
    data, labels = batch.get("data"), batch.get("labels")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or labels is None:
        raise DatasetError(f"'{path}' lacks uint8 'data' or 'labels'; not a CIFAR-10 python batch (re-extract it)")
    if data.ndim == 2 and data.shape[1] == 3 * 32 * 32:
        data = data.reshape(-1, 3, 32, 32)
    if data.shape[1:] != (3, 32, 32):
        raise DatasetError(f"'{path}' data has shape {data.shape}, expected (N, 3072); not a CIFAR-10 batch")
    try:
        label_array = np.asarray(labels)
        if label_array.dtype.kind not in "iu" or label_array.ndim != 1:
            raise ValueError
    except ValueError:
        raise DatasetError(f"'{path}' labels are not a list of integers; not a CIFAR-10 batch (re-extract it)") from None
    label_tensor = torch.from_numpy(label_array.astype(np.int64))
    _check_labels(label_tensor, len(data), f"'{path}'", num_classes=10)
    return torch.from_numpy(np.ascontiguousarray(data)), label_tensor


def _detect_cifar(path: Path, names: set[str]) -> bool:
    return bool(names & {*_CIFAR_TRAIN, "test_batch"})


def _read_cifar_folder(path: Path, names: set[str], known: str | None) -> _Raw:
    missing = [n for n in (*_CIFAR_TRAIN, "test_batch") if n not in names]
    if missing:
        raise DatasetError(f"'{path}' looks like a CIFAR-10 python folder but lacks {', '.join(missing)}; "
                           f"re-extract cifar-10-python.tar.gz")
    parts = [_read_cifar_batch(path / n) for n in _CIFAR_TRAIN]
    train = (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))
    test = _read_cifar_batch(path / "test_batch")
    notes = [f"read CIFAR-10 python batches from {path} (restricted unpickler: numpy arrays only)"]
    classes = [str(i) for i in range(10)]
    if "batches.meta" in names:
        names_in_meta = _unpickle_dict(path / "batches.meta").get("label_names")
        if isinstance(names_in_meta, list) and len(names_in_meta) == 10:
            classes = [n.decode("latin1") if isinstance(n, bytes) else str(n) for n in names_in_meta]
    else:
        notes.append("no batches.meta: classes are named 0..9")
    info = DatasetInfo("cifar-10", "cifar10-python", path, 10, classes, (3, 32, 32), len(train[1]), len(test[1]), notes)
    return _stored_raw(info, train, test)


# -------------------------------------------------------------------------------------------------- ImageFolder


def _image_files(folder: Path) -> list[str]:
    found = []
    for root, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [os.path.join(root, f) for f in sorted(files)
                  if not f.startswith(".") and os.path.splitext(f)[1].lower() in IMAGE_SUFFIXES]
    return found


def _class_dirs(folder: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))


def _detect_imagefolder(path: Path, names: set[str]) -> bool:
    if "train" in names and (path / "train").is_dir():
        return True
    return any(_image_files_exist(path / d) for d in _class_dirs(path))


def _image_files_exist(folder: Path) -> bool:
    for _root, _dirs, files in os.walk(folder, followlinks=True):
        if any(os.path.splitext(f)[1].lower() in IMAGE_SUFFIXES for f in files):
            return True
    return False


def _scan_classes(folder: Path, classes: list[str]) -> tuple[list[str], torch.Tensor]:
    files, labels = [], []
    for label, name in enumerate(classes):
        if not (folder / name).is_dir():
            continue
        found = _image_files(folder / name)
        files += found
        labels += [label] * len(found)
    return files, torch.tensor(labels, dtype=torch.int64)


def _read_imagefolder(path: Path, names: set[str], known: str | None) -> _Raw:
    test_name = next((n for n in ("val", "test") if n in names and (path / n).is_dir()), None)
    notes = []
    if "train" in names and (path / "train").is_dir():
        if test_name is None:
            raise DatasetError(f"'{path}' has train/ but no val/ or test/ folder; add one (class subfolders of images) "
                               f"or pass a folder of class subfolders alone")
        classes = _class_dirs(path / "train")
        extra = sorted(set(_class_dirs(path / test_name)) - set(classes))
        if extra:
            raise DatasetError(f"'{path / test_name}' has classes missing from train/ ({', '.join(extra[:5])}); "
                               f"every {test_name}/ class needs a train/ folder")
        train = _scan_classes(path / "train", classes)
        test = _scan_classes(path / test_name, classes)
        notes.append(f"read ImageFolder {path}: train/ and {test_name}/, {len(classes)} classes")
    else:
        classes = _class_dirs(path)
        files, labels = _scan_classes(path, classes)
        order = torch.randperm(len(files), generator=torch.Generator().manual_seed(_HOLDOUT_SEED))
        held = torch.zeros(len(files), dtype=torch.bool)
        for label in range(len(classes)):  # per class, so every class is in the test split
            members = order[labels[order] == label]
            held[members[: math.ceil(len(members) * IMAGEFOLDER_TEST_FRACTION)]] = True
        pick = lambda mask: ([files[i] for i in mask.nonzero().flatten().tolist()], labels[mask])  # noqa: E731
        train, test = pick(~held), pick(held)
        notes.append(f"read ImageFolder {path}: {len(classes)} classes, no train/ and val/ folders: held out "
                     f"{IMAGEFOLDER_TEST_FRACTION:.0%} of each class (fixed seed) as the test split")
    for split, where in ((train, "train"), (test, test_name or "held-out test")):
        if not split[0]:
            raise DatasetError(f"'{path}' ImageFolder has no images in its {where} split (recognised: "
                               f"{', '.join(sorted(IMAGE_SUFFIXES))})")
    _require_pillow()
    info = DatasetInfo(path.name, "imagefolder", path, len(classes), classes, (3, None, None), len(train[1]),
                       len(test[1]), notes)

    def stats(channels: int):
        if channels == 1:  # grey = channel average: the mean of the means; the std of the strongly correlated
            grey = (round(sum(IMAGENET_MEAN) / 3, 4),), (round(sum(IMAGENET_STD) / 3, 4),)  # channels, ≈ their mean
            return *grey, f"normalised with ImageNet's mean and std averaged to grey ({grey[0][0]}, {grey[1][0]})"
        return IMAGENET_MEAN, IMAGENET_STD, "normalised with ImageNet's mean (0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225)"

    return _Raw(info, train, test, lambda split, idx, adapter: ImageFiles(split[0], split[1], idx, adapter), stats)


def _require_pillow():
    try:
        import PIL.Image
    except ImportError:
        raise DatasetError("reading an ImageFolder needs Pillow: pip install pillow") from None
    return PIL.Image


def _decode_image(file: str, height: int, width: int) -> torch.Tensor:
    """Decode one image to uint8 RGB (3, height, width): the centred region of the target's aspect ratio, resized.

    The same cover-and-crop as InputAdapter, done by Pillow (bilinear, antialiased when shrinking) so that only
    the small uint8 result is stacked; JPEG decodes at a reduced scale when that is still ≥ the target size.
    """
    Image = _require_pillow()
    try:
        with Image.open(file) as image:
            image.draft("RGB", (width, height))
            image = image.convert("RGB")
            w, h = image.size
            scale = max(height / h, width / w)
            crop_w, crop_h = width / scale, height / scale
            box = ((w - crop_w) / 2, (h - crop_h) / 2, (w + crop_w) / 2, (h + crop_h) / 2)
            array = np.asarray(image.resize((width, height), Image.Resampling.BILINEAR, box=box))
    except Exception as exc:  # noqa: BLE001 - any decoder failure is one line
        raise DatasetError(f"cannot decode image '{file}' ({type(exc).__name__}: {exc}); remove or replace it") from None
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


# Recognised formats, tried in order: (detect(path, names in folder), read(path, names, known name)).
_FORMATS: tuple[tuple[Callable[[Path, set[str]], bool], Callable[[Path, set[str], str | None], _Raw]], ...] = (
    (_detect_idx, _read_idx_folder),
    (_detect_cifar, _read_cifar_folder),
    (_detect_imagefolder, _read_imagefolder),
)
