"""Readers for the built-in tasks' data: scikit-learn's digits, IDX files, CIFAR-10 batches."""

from __future__ import annotations

import functools
import gzip
import pickle
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from quantsearch.tasks._errors import TaskError

__all__ = [
    "CIFAR10_BATCHES",
    "IDX_FILES",
    "load_cifar10",
    "load_digits",
    "load_idx_dataset",
    "read_cifar_batch",
    "read_idx",
    "split_indices",
]

IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
CIFAR10_BATCHES = (*(f"data_batch_{number}" for number in range(1, 6)), "test_batch")
CIFAR10_SUBDIR = "cifar-10-batches-py"

# IDX type codes (third byte of the magic number) and their big-endian element types.
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled 8x8 digits: images (1797, 8, 8) float32 in [0, 1], labels int64."""
    from sklearn.datasets import load_digits as sklearn_load_digits

    bunch = sklearn_load_digits()
    images = (bunch.images / 16.0).astype(np.float32)
    return images, bunch.target.astype(np.int64)


def split_indices(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split ``range(len(labels))`` into (rest, held out) with ``ceil(fraction * n)`` held out.

    Stratified by label when every class can be represented, otherwise a plain shuffled split;
    both sides come out in a seed-determined shuffled order.
    """
    from sklearn.model_selection import train_test_split

    indices = np.arange(len(labels))
    try:
        rest, held = train_test_split(
            indices, test_size=fraction, random_state=seed, stratify=labels
        )
    except ValueError:
        rest, held = train_test_split(indices, test_size=fraction, random_state=seed)
    return np.asarray(rest), np.asarray(held)


def _file_key(path: Path) -> tuple[str, int, int]:
    stat = path.stat()
    return (str(path.resolve()), stat.st_mtime_ns, stat.st_size)


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (gzipped when its name ends in .gz) into a NumPy array.

    Raises TaskError for an unreadable gzip stream, a bad magic number, or a payload whose size
    differs from what the header's dimensions say.
    """
    path = Path(path)
    return _read_idx_cached(*_file_key(path)).copy()


@functools.lru_cache(maxsize=8)
def _read_idx_cached(resolved: str, mtime_ns: int, size: int) -> np.ndarray:
    path = Path(resolved)
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as handle:
                data = handle.read()
        else:
            data = path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:
        raise TaskError(f"{path}: cannot read ({exc})") from exc
    if len(data) < 4:
        raise TaskError(f"{path}: too short for an IDX file ({len(data)} bytes)")
    magic = struct.unpack(">I", data[:4])[0]
    zero, type_code, ndim = data[0] | data[1], data[2], data[3]
    if zero != 0 or type_code not in _IDX_DTYPES or ndim == 0:
        raise TaskError(
            f"{path}: bad magic number 0x{magic:08x}; an IDX file starts with two zero bytes, "
            "a type code (0x08 for unsigned bytes) and the number of dimensions "
            "(0x00000803 for images, 0x00000801 for labels)"
        )
    header = 4 + 4 * ndim
    if len(data) < header:
        raise TaskError(f"{path}: header truncated ({len(data)} bytes, {ndim} dimensions)")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    dtype = _IDX_DTYPES[type_code]
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    actual = len(data) - header
    if actual != expected:
        shape = "x".join(map(str, dims))
        raise TaskError(
            f"{path}: size mismatch: the header says {shape} ({expected} bytes of data) "
            f"but the file holds {actual} bytes after the header"
        )
    array = np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)
    array = array.astype(dtype.newbyteorder("="))
    array.flags.writeable = False
    return array


def _idx_candidates(stem: str) -> list[str]:
    # Some mirrors name the files with a dot before "idx" (train-images.idx3-ubyte).
    dotted = stem.replace("-idx", ".idx")
    return [stem, f"{stem}.gz", dotted, f"{dotted}.gz"]


def _describe_dirs(dirs: list[Path]) -> str:
    text = str(dirs[0])
    if len(dirs) > 1:
        text += f" (also looked in {', '.join(map(str, dirs[1:]))})"
    return text


def load_idx_dataset(
    task_name: str, data_dir: Path, raw_subdir: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Train images, train labels, test images, test labels of an MNIST-format dataset.

    Each file is looked for, plain or gzipped, in ``data_dir`` and then in
    ``data_dir/<raw_subdir>/raw`` (torchvision's layout). Images must be 28x28 with labels 0..9.
    """
    dirs = [data_dir, data_dir / raw_subdir / "raw"]
    if not data_dir.is_dir():
        raise TaskError(
            f"{task_name}: data directory {data_dir} does not exist; it should hold "
            f"{', '.join(IDX_FILES)} (each may be gzipped, .gz)"
        )
    found: dict[str, Path] = {}
    for stem in IDX_FILES:
        for directory in dirs:
            match = next(
                (
                    directory / name
                    for name in _idx_candidates(stem)
                    if (directory / name).is_file()
                ),
                None,
            )
            if match is not None:
                found[stem] = match
                break
    missing = [stem for stem in IDX_FILES if stem not in found]
    if missing:
        names = " and ".join(repr(name) for name in missing)
        raise TaskError(
            f"{task_name}: no {names} (or .gz) in {_describe_dirs(dirs)}; "
            f"expected the four IDX files {', '.join(IDX_FILES)}"
        )
    arrays = [read_idx(found[stem]) for stem in IDX_FILES]
    train_x, train_y, test_x, test_y = arrays
    for images, labels, images_stem, labels_stem in (
        (train_x, train_y, IDX_FILES[0], IDX_FILES[1]),
        (test_x, test_y, IDX_FILES[2], IDX_FILES[3]),
    ):
        images_path, labels_path = found[images_stem], found[labels_stem]
        if images.ndim != 3 or images.shape[1:] != (28, 28):
            raise TaskError(
                f"{images_path}: expected images of shape N x 28 x 28, got "
                f"{' x '.join(map(str, images.shape))}"
            )
        if labels.ndim != 1:
            raise TaskError(
                f"{labels_path}: expected a 1-dimensional label file, got {labels.ndim} dimensions"
            )
        if len(images) != len(labels):
            raise TaskError(
                f"{task_name}: {images_path} holds {len(images)} images but {labels_path} "
                f"holds {len(labels)} labels"
            )
        if len(labels) == 0:
            raise TaskError(f"{labels_path}: holds no examples")
        if labels.min() < 0 or labels.max() > 9:
            raise TaskError(
                f"{labels_path}: labels must be 0..9, found {labels.min()}..{labels.max()}"
            )
    return train_x, train_y.astype(np.int64), test_x, test_y.astype(np.int64)


class _CifarUnpickler(pickle.Unpickler):
    """Loads only what a CIFAR-10 batch holds (dicts, lists, bytes, NumPy arrays)."""

    _ALLOWED = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy.core.multiarray", "scalar"),
            ("numpy._core.multiarray", "scalar"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("_codecs", "encode"),
        }
    )

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"'{module}.{name}' is not allowed in a CIFAR-10 batch")
        if module == "numpy.core.multiarray":
            module = "numpy._core.multiarray" if hasattr(np, "_core") else module
        return super().find_class(module, name)


def read_cifar_batch(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 3, 32, 32) uint8 and labels (N,) int64 from one CIFAR-10 python batch."""
    path = Path(path)
    images, labels = _read_cifar_cached(*_file_key(path))
    return images.copy(), labels.copy()


@functools.lru_cache(maxsize=8)
def _read_cifar_cached(resolved: str, mtime_ns: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    path = Path(resolved)
    try:
        with path.open("rb") as handle:
            batch = _CifarUnpickler(handle, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as exc:
        raise TaskError(f"{path}: not a CIFAR-10 python batch ({exc})") from exc
    except OSError as exc:
        raise TaskError(f"{path}: cannot read ({exc})") from exc
    if not isinstance(batch, dict):
        raise TaskError(
            f"{path}: not a CIFAR-10 python batch (a {type(batch).__name__}, not a dict)"
        )
    data = batch.get(b"data", batch.get("data"))
    labels = batch.get(b"labels", batch.get("labels"))
    if data is None or labels is None:
        keys = ", ".join(sorted(repr(key) for key in batch))
        raise TaskError(f"{path}: a CIFAR-10 batch needs keys b'data' and b'labels'; found {keys}")
    if not isinstance(data, np.ndarray) or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        shape = getattr(data, "shape", type(data).__name__)
        raise TaskError(f"{path}: b'data' must be an N x 3072 array, got {shape}")
    if data.dtype != np.uint8:
        raise TaskError(f"{path}: b'data' must hold uint8 pixels, got {data.dtype}")
    try:
        label_array = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError) as exc:
        raise TaskError(f"{path}: b'labels' must be a list of integers ({exc})") from exc
    if label_array.ndim != 1 or len(label_array) != len(data):
        raise TaskError(f"{path}: {len(data)} images but {label_array.size} labels in b'labels'")
    if len(label_array) == 0:
        raise TaskError(f"{path}: holds no examples")
    if label_array.min() < 0 or label_array.max() > 9:
        raise TaskError(
            f"{path}: labels must be 0..9, found {label_array.min()}..{label_array.max()}"
        )
    images = data.reshape(-1, 3, 32, 32)
    images.flags.writeable = False
    label_array.flags.writeable = False
    return images, label_array


def load_cifar10(data_dir: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Train images, train labels, test images, test labels from the CIFAR-10 python batches.

    The batches are looked for in ``data_dir`` and then in ``data_dir/cifar-10-batches-py``.
    """
    dirs = [data_dir, data_dir / CIFAR10_SUBDIR]
    expected = ", ".join(CIFAR10_BATCHES)
    if not data_dir.is_dir():
        raise TaskError(
            f"cifar10: data directory {data_dir} does not exist; it should hold {expected}"
        )
    directory = next(
        (d for d in dirs if all((d / name).is_file() for name in CIFAR10_BATCHES)), None
    )
    if directory is None:
        best = max(dirs, key=lambda d: sum((d / name).is_file() for name in CIFAR10_BATCHES))
        missing = [name for name in CIFAR10_BATCHES if not (best / name).is_file()]
        hint = ""
        if any((d / "cifar-10-python.tar.gz").is_file() for d in dirs):
            hint = "; cifar-10-python.tar.gz is there: extract it first (tar xzf)"
        raise TaskError(
            f"cifar10: no {' and '.join(map(repr, missing))} in {_describe_dirs(dirs)}; "
            f"expected the python batches {expected}{hint}"
        )
    train = [read_cifar_batch(directory / name) for name in CIFAR10_BATCHES[:-1]]
    test_x, test_y = read_cifar_batch(directory / CIFAR10_BATCHES[-1])
    train_x = np.concatenate([images for images, _ in train])
    train_y = np.concatenate([labels for _, labels in train])
    return train_x, train_y, test_x, test_y
