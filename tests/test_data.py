"""The data layer of `search`: real Fashion-MNIST, CIFAR-10 batches and ImageFolders, adapted to the model."""

import gzip
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from dyncompile import data
from dyncompile.data import DatasetError, loader, open_dataset
from dyncompile.errors import ConfigError, DyncompileError

FASHION = data.KNOWN_DATASETS["fashion-mnist"][0]
needs_fashion = pytest.mark.skipif(not FASHION.is_dir(), reason="Debian package dataset-fashion-mnist not installed")


def one_line_error(exc_info, *fragments):
    text = str(exc_info.value)
    assert isinstance(exc_info.value, DyncompileError)
    assert "\n" not in text, text
    for fragment in fragments:
        assert fragment in text, text


# ------------------------------------------------------------------------------------------------- writers


def write_idx(path: Path, array: np.ndarray, *, gz: bool = True) -> None:
    payload = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    payload += array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(payload) if gz else payload)


def idx_folder(root: Path, *, n_train=40, n_test=20, size=8, gz=True, classes=4) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    suffix = ".gz" if gz else ""
    for split, n in (("train", n_train), ("t10k", n_test)):
        write_idx(root / f"{split}-images-idx3-ubyte{suffix}", rng.integers(0, 256, (n, size, size)), gz=gz)
        write_idx(root / f"{split}-labels-idx1-ubyte{suffix}", np.arange(n) % classes, gz=gz)
    return root


def cifar_batch(n: int, offset: int = 0) -> dict:
    images = np.empty((n, 3, 32, 32), np.uint8)
    images[:, 0], images[:, 1], images[:, 2] = 10, 20, 30  # channel planes told apart by value
    return {"batch_label": "training batch", "labels": [(offset + i) % 10 for i in range(n)],
            "data": images.reshape(n, 3072), "filenames": [f"img_{offset + i}.png" for i in range(n)]}


def cifar_folder(root: Path, *, n=6, protocol=pickle.DEFAULT_PROTOCOL, meta=True) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for k, name in enumerate(names):
        (root / name).write_bytes(pickle.dumps(cifar_batch(n, k * n), protocol=protocol))
    if meta:
        labels = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
        (root / "batches.meta").write_bytes(pickle.dumps({"label_names": labels, "num_vis": 3072}, protocol=protocol))
    return root


def write_image(path: Path, color, size=(20, 12)) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


# --------------------------------------------------------------------------------------------- Fashion-MNIST


@pytest.fixture(scope="module")
def fashion():
    return open_dataset("fashion-mnist", input_shape=(1, 3, 32, 32))


@needs_fashion
def test_fashion_mnist_loads_with_its_official_splits(fashion):
    info = fashion.info
    assert (info.name, info.format, info.num_classes, info.input_shape) == ("fashion-mnist", "idx", 10, (1, 28, 28))
    assert (info.train_size, info.test_size) == (60000, 10000)
    assert info.classes[0] == "T-shirt/top" and info.classes[9] == "Ankle boot"
    assert (len(fashion.train), len(fashion.search), len(fashion.test)) == (54000, 6000, 10000)
    # Fashion-MNIST is balanced: 6,000 training and 1,000 test images per class.
    all_train = torch.cat([fashion.train.labels, fashion.search.labels])
    assert torch.bincount(all_train, minlength=10).tolist() == [6000] * 10
    assert torch.bincount(fashion.test.labels, minlength=10).tolist() == [1000] * 10
    assert torch.bincount(fashion.search.labels, minlength=10).min() > 450  # a random 10%, so roughly 600 each


@needs_fashion
def test_fashion_mnist_adapts_to_three_channels_at_32(fashion):
    image, label = fashion.train[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and 0 <= label < 10
    assert torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])
    assert any("28×28 → 32×32" in n for n in fashion.notes)
    assert any("repeated to 3 channels" in n for n in fashion.notes)
    assert any("mean (0.2860)" in n and "std (0.3530)" in n for n in fashion.notes)
    images, labels = next(iter(loader(fashion.train, 64, shuffle=False)))
    assert images.shape == (64, 3, 32, 32) and labels.dtype == torch.int64
    assert torch.allclose(images[0], image) and int(labels[0]) == label


@needs_fashion
def test_fashion_mnist_is_normalised_at_native_shape():
    splits = open_dataset("fashion-mnist", input_shape=(1, 28, 28), train_limit=2000, val_limit=500)
    assert not any("resized" in n or "channels" in n for n in splits.notes)
    images = torch.cat([b for b, _ in loader(splits.train, 500, shuffle=False)])
    assert images.shape == (2000, 1, 28, 28)
    assert abs(images.mean().item()) < 0.05 and abs(images.std().item() - 1) < 0.05


@needs_fashion
def test_search_split_is_disjoint_from_train_and_seeded(fashion):
    train, search = set(fashion.train.indices.tolist()), set(fashion.search.indices.tolist())
    assert not train & search and len(train | search) == 60000
    again = open_dataset("fashion-mnist", input_shape=(1, 3, 32, 32))
    assert torch.equal(again.search.indices, fashion.search.indices)
    other = open_dataset("fashion-mnist", input_shape=(1, 3, 32, 32), seed=1)
    assert not torch.equal(other.search.indices, fashion.search.indices)


@needs_fashion
def test_limits_give_deterministic_nested_subsets():
    small = open_dataset(FASHION, input_shape=(1, 1, 28, 28), train_limit=900, val_limit=300)
    large = open_dataset(FASHION, input_shape=(1, 1, 28, 28), train_limit=1800, val_limit=600)
    assert (len(small.train), len(small.search), len(small.test)) == (900, 100, 300)  # search keeps the 90/10 ratio
    assert torch.equal(large.train.indices[:900], small.train.indices)
    assert torch.equal(large.test.indices[:300], small.test.indices)
    reseeded = open_dataset(FASHION, input_shape=(1, 1, 28, 28), train_limit=900, val_limit=300, seed=7)
    assert torch.equal(reseeded.test.indices, small.test.indices)  # every seed validates on the same images
    assert not torch.equal(reseeded.train.indices, small.train.indices)
    capped = open_dataset(FASHION, input_shape=(1, 1, 28, 28), train_limit=900, search_limit=40)
    assert len(capped.search) == 40


# ------------------------------------------------------------------------------------------------- loader


def test_loader_order_depends_on_seed_and_epoch_only(tmp_path):
    splits = open_dataset(idx_folder(tmp_path / "idx", n_train=40), input_shape=(1, 8, 8), search_fraction=0.0)
    order = lambda **kw: torch.cat([y for _, y in loader(splits.train, 8, shuffle=True, **kw)]).tolist()  # noqa: E731
    assert order(seed=0, epoch=2) == order(seed=0, epoch=2)
    assert order(seed=0, epoch=2) != order(seed=0, epoch=3) != order(seed=1, epoch=2)
    full = [b.tolist() for _, b in loader(splits.train, 8, shuffle=True, seed=0, epoch=2)]
    resumed = [b.tolist() for _, b in loader(splits.train, 8, shuffle=True, seed=0, epoch=2, start_batch=2)]
    assert resumed == full[2:]
    assert len(list(loader(splits.train, 16, shuffle=False, drop_last=True))) == 2
    ranks = [list(loader(splits.train, 6, shuffle=True, seed=0, rank=r, world_size=3)) for r in range(3)]
    assert len({len(r) for r in ranks}) == 1  # every DDP rank steps the same number of times
    assert sum(len(y) for r in ranks for _, y in r) == 42  # 40 padded by wrapping to a multiple of 3
    with pytest.raises(ConfigError) as exc:
        loader(splits.train, 0, shuffle=False)
    one_line_error(exc, "batch size")


def test_loader_works_with_any_dataset():
    plain = torch.utils.data.TensorDataset(torch.arange(10.0).view(10, 1), torch.arange(10))
    batches = list(loader(plain, 4, shuffle=True, seed=3))
    assert sorted(torch.cat([y for _, y in batches]).tolist()) == list(range(10))


# ---------------------------------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("gz", [True, False])
def test_idx_folder_gzipped_or_not(tmp_path, gz):
    splits = open_dataset(idx_folder(tmp_path / "digits", gz=gz), input_shape=(1, 1, 8, 8))
    assert (splits.info.name, splits.info.num_classes, splits.info.classes) == ("digits", 4, ["0", "1", "2", "3"])
    assert (len(splits.train), len(splits.search), len(splits.test)) == (36, 4, 20)


def test_idx_bad_magic(tmp_path):
    root = idx_folder(tmp_path / "idx")
    (root / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"\x12\x34\x56\x78" + bytes(50)))
    with pytest.raises(DatasetError) as exc:
        open_dataset(root, input_shape=(1, 8, 8))
    one_line_error(exc, "train-labels-idx1-ubyte.gz", "bad magic", "re-download")


def test_idx_wrong_size(tmp_path):
    root = idx_folder(tmp_path / "idx")
    payload = gzip.decompress((root / "t10k-images-idx3-ubyte.gz").read_bytes())
    (root / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(payload[:-7]))
    with pytest.raises(DatasetError) as exc:
        open_dataset(root, input_shape=(1, 8, 8))
    one_line_error(exc, "t10k-images-idx3-ubyte.gz", "truncated")


def test_idx_truncated_gzip_stream(tmp_path):
    root = idx_folder(tmp_path / "idx")
    raw = (root / "train-images-idx3-ubyte.gz").read_bytes()
    (root / "train-images-idx3-ubyte.gz").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DatasetError) as exc:
        open_dataset(root, input_shape=(1, 8, 8))
    one_line_error(exc, "train-images-idx3-ubyte.gz", "truncated or corrupt")


def test_idx_label_count_mismatch(tmp_path):
    root = idx_folder(tmp_path / "idx", n_train=40)
    write_idx(root / "train-labels-idx1-ubyte.gz", np.arange(39) % 4)
    with pytest.raises(DatasetError) as exc:
        open_dataset(root, input_shape=(1, 8, 8))
    one_line_error(exc, "40 images but 39 labels")


def test_idx_missing_test_files(tmp_path):
    root = idx_folder(tmp_path / "idx")
    (root / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DatasetError) as exc:
        open_dataset(root, input_shape=(1, 8, 8))
    one_line_error(exc, "lacks t10k-labels-idx1-ubyte[.gz]")


# ------------------------------------------------------------------------------------------------ CIFAR-10


@pytest.mark.parametrize("protocol", [2, pickle.DEFAULT_PROTOCOL])
def test_cifar_batches_folder_loads(tmp_path, protocol):
    splits = open_dataset(cifar_folder(tmp_path / "cifar-10-batches-py", protocol=protocol),
                          input_shape=(1, 3, 32, 32), normalize=False)
    info = splits.info
    assert (info.name, info.format, info.num_classes, info.input_shape) == ("cifar-10", "cifar10-python", 10, (3, 32, 32))
    assert (info.train_size, info.test_size, info.classes[3]) == (30, 6, "cat")
    assert (len(splits.train), len(splits.search), len(splits.test)) == (27, 3, 6)
    images, labels = next(iter(loader(splits.test, 6, shuffle=False)))
    assert labels.tolist() == [0, 1, 2, 3, 4, 5]  # test_batch holds offsets 30..35
    assert [round(images[0, c].mean().item() * 255) for c in range(3)] == [10, 20, 30]  # planes in R, G, B order


def test_cifar_written_by_numpy_1_loads(tmp_path):
    # The real files name numpy 1's modules (numpy.core.multiarray); protocol 2 names globals as plain text.
    root = cifar_folder(tmp_path / "c", protocol=2)
    for f in root.iterdir():
        f.write_bytes(f.read_bytes().replace(b"numpy._core.", b"numpy.core."))
    assert b"numpy.core.multiarray" in (root / "test_batch").read_bytes()
    assert len(open_dataset(root, input_shape=(3, 32, 32)).test) == 6


def test_cifar_to_grayscale_28(tmp_path):
    splits = open_dataset(cifar_folder(tmp_path / "c"), input_shape=(1, 1, 28, 28), normalize=False)
    image, _ = splits.train[0]
    assert image.shape == (1, 28, 28) and torch.allclose(image, torch.full_like(image, 20 / 255))
    assert any("RGB averaged to 1 channel" in n for n in splits.notes)
    assert any("32×32 → 28×28" in n for n in splits.notes)


class RunsCode:
    def __init__(self, call, arg):
        self.call, self.arg = call, arg

    def __reduce__(self):
        return self.call, (self.arg,)


@pytest.mark.parametrize("call", ["os.system", "builtins.exec"])
def test_cifar_malicious_pickle_is_refused_without_running(tmp_path, call):
    root = cifar_folder(tmp_path / "c")
    marker = tmp_path / "pwned"
    payload = {"os.system": (os.system, f"touch {marker}"),
               "builtins.exec": (exec, f"open({str(marker)!r}, 'w').close()")}[call]
    batch = cifar_batch(6)
    batch["labels"] = RunsCode(*payload)
    (root / "data_batch_2").write_bytes(pickle.dumps(batch))
    with pytest.raises(DatasetError) as exc:
        open_dataset(root, input_shape=(3, 32, 32))
    one_line_error(exc, "data_batch_2", "refused")
    assert not marker.exists()


def test_cifar_missing_and_corrupt_batches(tmp_path):
    root = cifar_folder(tmp_path / "c")
    (root / "data_batch_3").unlink()
    with pytest.raises(DatasetError) as exc:
        open_dataset(root, input_shape=(3, 32, 32))
    one_line_error(exc, "lacks data_batch_3", "cifar-10-python.tar.gz")

    root = cifar_folder(tmp_path / "d")
    raw = (root / "test_batch").read_bytes()
    (root / "test_batch").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DatasetError) as exc:
        open_dataset(root, input_shape=(3, 32, 32))
    one_line_error(exc, "test_batch", "truncated or corrupt")

    root = cifar_folder(tmp_path / "e")
    (root / "data_batch_1").write_bytes(pickle.dumps({"labels": [1, 2]}))
    with pytest.raises(DatasetError) as exc:
        open_dataset(root, input_shape=(3, 32, 32))
    one_line_error(exc, "data_batch_1", "not a CIFAR-10 python batch")

    root = cifar_folder(tmp_path / "f")
    batch = cifar_batch(6)
    batch["labels"] = batch["labels"][:5]
    (root / "data_batch_4").write_bytes(pickle.dumps(batch))
    with pytest.raises(DatasetError) as exc:
        open_dataset(root, input_shape=(3, 32, 32))
    one_line_error(exc, "6 images but 5 labels")


# ---------------------------------------------------------------------------------------------- ImageFolder


def test_imagefolder_with_train_and_val(tmp_path):
    pytest.importorskip("PIL")
    root = tmp_path / "shapes"
    for split, n in (("train", 4), ("val", 2)):
        for k in range(n):
            write_image(root / split / "red" / f"{k}.png", (255, 0, 0), size=(20 + k, 12))
            write_image(root / split / "zblue" / f"{k}.jpg", (0, 0, 255), size=(12, 30))
    (root / "train" / "red" / "notes.txt").write_text("not an image")
    splits = open_dataset(root, input_shape=(1, 3, 16, 16), normalize=False, search_fraction=0.25)
    info = splits.info
    assert (info.format, info.classes, info.input_shape) == ("imagefolder", ["red", "zblue"], (3, None, None))
    assert (info.train_size, info.test_size, len(splits.search)) == (8, 4, 2)
    images, labels = next(iter(loader(splits.test, 4, shuffle=False)))
    assert images.shape == (4, 3, 16, 16) and labels.tolist() == [0, 0, 1, 1]
    assert images[0, 0].min() > 0.95 and images[0, 2].max() < 0.05  # red stays red
    assert images[3, 2].min() > 0.9 and images[3, 0].max() < 0.1  # blue (JPEG) stays blue
    assert any("centre crop" in n for n in splits.notes)


def test_imagefolder_of_class_folders_holds_out_a_test_split(tmp_path):
    pytest.importorskip("PIL")
    root = tmp_path / "pets"
    for k in range(5):
        write_image(root / "cat" / f"{k}.png", (k * 40, 0, 0))
        write_image(root / "dog" / "nested" / f"{k}.png", (0, k * 40, 0))
    splits = open_dataset(root, input_shape=(1, 1, 8, 8))
    assert (splits.info.train_size, splits.info.test_size) == (8, 2)
    assert sorted(splits.test.labels.tolist()) == [0, 1]  # one of each class
    assert any("held out" in n for n in splits.notes) and any("averaged to 1 channel" in n for n in splits.notes)
    assert splits.train[0][0].shape == (1, 8, 8)
    again = open_dataset(root, input_shape=(1, 1, 8, 8), seed=5)
    assert again.test.files == splits.test.files  # the held-out split does not move with the seed


def test_imagefolder_undecodable_image(tmp_path):
    pytest.importorskip("PIL")
    root = tmp_path / "broken"
    for k in range(3):
        write_image(root / "a" / f"{k}.png", (1, 2, 3))
    (root / "a" / "3.png").write_bytes(b"\x89PNG not really")
    splits = open_dataset(root, input_shape=(3, 8, 8), search_fraction=0.0)
    with pytest.raises(DatasetError) as exc:
        for _ in loader(splits.train, 4, shuffle=False):
            pass
    one_line_error(exc, "3.png", "cannot decode", "remove or replace")


def test_imagefolder_needs_val_next_to_train(tmp_path):
    pytest.importorskip("PIL")
    write_image(tmp_path / "ds" / "train" / "a" / "0.png", (0, 0, 0))
    with pytest.raises(DatasetError) as exc:
        open_dataset(tmp_path / "ds", input_shape=(3, 8, 8))
    one_line_error(exc, "no val/ or test/")


# ------------------------------------------------------------------------------------------------ errors


def test_missing_path(tmp_path):
    with pytest.raises(ConfigError) as exc:
        open_dataset(tmp_path / "nope", input_shape=(1, 28, 28))
    one_line_error(exc, "does not exist", "fashion-mnist")


def test_unknown_name():
    with pytest.raises(ConfigError) as exc:
        open_dataset("imagenet-21k", input_shape=(1, 28, 28))
    one_line_error(exc, "unknown dataset 'imagenet-21k'", "known names: fashion-mnist")


def test_known_name_not_installed(tmp_path, monkeypatch):
    monkeypatch.setitem(data.KNOWN_DATASETS, "fashion-mnist", (tmp_path / "absent", "apt-get install dataset-fashion-mnist"))
    with pytest.raises(ConfigError) as exc:
        open_dataset("fashion-mnist", input_shape=(1, 28, 28))
    one_line_error(exc, "not installed", "apt-get install dataset-fashion-mnist")


def test_a_file_instead_of_a_folder(tmp_path):
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"x")
    with pytest.raises(ConfigError) as exc:
        open_dataset(tmp_path / "cifar-10-python.tar.gz", input_shape=(3, 32, 32))
    one_line_error(exc, "is a file", "pass the folder")


def test_unrecognised_folder(tmp_path):
    (tmp_path / "readme.txt").write_text("hello")
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(DatasetError) as exc:
        open_dataset(tmp_path, input_shape=(1, 28, 28))
    one_line_error(exc, "not a dataset folder", "readme.txt", "train-images-idx3-ubyte", "data_batch_1", "ImageFolder")


@pytest.mark.parametrize("shape", [(1, 4, 8, 8), (2, 8, 8)])
def test_model_channels_the_data_cannot_feed(tmp_path, shape):
    with pytest.raises(ConfigError) as exc:
        open_dataset(idx_folder(tmp_path / "idx"), input_shape=shape)
    one_line_error(exc, f"takes {shape[-3]} input channels", "1↔3")


@pytest.mark.parametrize("kwargs, fragment", [
    ({"input_shape": (8, 8)}, "input shape"),
    ({"input_shape": (1, 0, 8)}, "input shape"),
    ({"input_shape": (1, 8, 8), "search_fraction": 1.0}, "search fraction"),
    ({"input_shape": (1, 8, 8), "train_limit": 0}, "train limit"),
    ({"input_shape": (1, 8, 8), "val_limit": -3}, "val limit"),
])
def test_bad_arguments(tmp_path, kwargs, fragment):
    with pytest.raises(ConfigError) as exc:
        open_dataset(idx_folder(tmp_path / "idx"), **kwargs)
    one_line_error(exc, fragment)


def test_limit_beyond_the_data_is_noted(tmp_path):
    splits = open_dataset(idx_folder(tmp_path / "idx"), input_shape=(1, 8, 8), train_limit=1000)
    assert len(splits.train) == 36 and any("exceeds the 36 images" in n for n in splits.notes)
