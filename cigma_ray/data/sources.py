"""Image sources: an ImageFolder tree or a Parquet table of encoded images, listed deterministically.

An image's id is its position in the sorted listing, so every process (driver, actor, resume)
agrees on it. Images are decoded lazily; one that cannot be decoded is reported, not raised.
"""
from __future__ import annotations

import hashlib
import io
import posixpath
from dataclasses import dataclass
from typing import Callable

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")
IMAGE_COLUMNS = ("image", "img", "jpg", "jpeg", "png", "image_bytes", "bytes")
LABEL_COLUMNS = ("label", "labels", "class", "target")


class DataError(ValueError):
    """Data that cannot be used; the message names the path and the fix."""


class ImageReadError(OSError):
    """Reading images' bytes failed (storage, network): not the images' fault. The unit that read them fails and
    is retried like any unit failure; only an image that cannot be decoded is skipped and recorded."""


@dataclass(frozen=True)
class Record:
    image_id: int
    path: str  # file path, or "table.parquet#row" for a table row
    label: int


class ImageSource:
    """A listed data set: records, class names, and a way to read one image's bytes."""

    def __init__(self, url: str, records: list[Record], classes: list[str], read: Callable[[Record], bytes],
                 prefetch: Callable[[list[Record]], None] | None = None):
        if not records:
            raise DataError(f"--data {url}: no images found (ImageFolder layout root/<class>/<image> "
                            f"with {', '.join(IMAGE_SUFFIXES)}, or a Parquet table with an image and a label column)")
        self.url = url
        self.records = records
        self.classes = classes
        self._read = read
        self._prefetch = prefetch  # reads a batch's bytes together (Parquet: by row group)

    def __len__(self) -> int:
        return len(self.records)

    def fingerprint(self) -> str:
        """Hash of the listing (paths and labels): a changed data set is noticed on resume."""
        h = hashlib.sha256()
        for r in self.records:
            h.update(f"{r.image_id}\t{r.path}\t{r.label}\n".encode())
        return h.hexdigest()

    def check_classes(self, num_classes: int, model_name: str) -> None:
        """Fail early when labels cannot be model outputs."""
        if all(c.isdigit() for c in self.classes):
            too_big = [c for c in self.classes if int(c) >= num_classes]
            if too_big:
                raise DataError(f"--data {self.url}: class index {too_big[0]} does not exist in {model_name}, "
                                f"which has {num_classes} classes")
        elif len(self.classes) != num_classes:
            raise DataError(f"--data {self.url} has {len(self.classes)} classes but {model_name} outputs "
                            f"{num_classes}; pass --num-classes {len(self.classes)} with a checkpoint trained on "
                            "these classes, or name the class folders by the model's class index (0, 1, ...)")

    def load(self, records: list[Record], transform: Callable) -> tuple[torch.Tensor | None, list[Record], list[tuple[Record, str]]]:
        """(stacked tensors, records that loaded, (record, error) for those that could not be decoded).

        A failed read of the bytes raises ImageReadError instead: a flaky GET must fail (and retry) the unit,
        never drop the image from D for good."""
        tensors, ok, failed = [], [], []
        if self._prefetch is not None:
            try:
                self._prefetch(records)
            except Exception as e:  # noqa: BLE001 - storage and network errors come in many types
                raise ImageReadError(f"reading {len(records)} images of {self.url}: {type(e).__name__}: {e}") from e
        for r in records:
            try:
                data = self._read(r)
            except Exception as e:  # noqa: BLE001 - as above
                raise ImageReadError(f"reading {r.path}: {type(e).__name__}: {e}") from e
            try:
                with Image.open(io.BytesIO(data)) as img:
                    tensors.append(transform(img.convert("RGB")))
                ok.append(r)
            except Exception as e:  # noqa: BLE001 - any decode error is a per-image failure
                failed.append((r, f"{type(e).__name__}: {e}"))
        return (torch.stack(tensors) if tensors else None), ok, failed


def class_indices(classes: list[str]) -> list[int]:
    """Model output index of each class: its integer name, or its sorted position when names are words."""
    if classes and all(c.isdigit() for c in classes):
        return [int(c) for c in classes]
    return list(range(len(classes)))


def open_source(url: str) -> ImageSource:
    """An ImageFolder directory, or a Parquet file or directory of Parquet files."""
    try:
        fs, root = fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as e:
        raise DataError(f"--data {url}: {e}") from None
    if not fs.exists(root):
        raise DataError(f"--data {url}: does not exist")
    if fs.isfile(root):
        if not root.endswith(".parquet"):
            raise DataError(f"--data {url}: a file must be a .parquet table; for images use a folder root/<class>/<image>")
        return _parquet_source(url, fs, [root])
    files = sorted(fs.find(root))
    tables = [f for f in files if f.endswith(".parquet")]
    if tables:
        return _parquet_source(url, fs, tables)
    return _folder_source(url, fs, root, files)


def _folder_source(url: str, fs, root: str, files: list[str]) -> ImageSource:
    by_class: dict[str, list[str]] = {}
    for f in files:
        rel = posixpath.relpath(f, root).split("/")
        if len(rel) == 2 and f.lower().endswith(IMAGE_SUFFIXES) and not rel[1].startswith("."):
            by_class.setdefault(rel[0], []).append(f)
    classes = sorted(by_class, key=lambda c: (int(c), c) if c.isdigit() else (float("inf"), c))
    index = class_indices(classes)
    records = [Record(i, path, label) for i, (label, path) in
               enumerate((index[k], p) for k, c in enumerate(classes) for p in sorted(by_class[c]))]
    return ImageSource(url, records, classes, lambda r: fs.cat_file(r.path))


def _read_column(fs, path: str, column: str) -> list:
    with fs.open(path, "rb") as f:
        return pq.read_table(f, columns=[column]).column(0).to_pylist()


class ParquetRows:
    """Cells of one column of Parquet files by row, read through pyarrow's row groups: a batch of rows
    costs the row groups that hold them (then `take`), never the whole column of a file."""

    def __init__(self, fs, column: str):
        self.fs, self.column = fs, column
        self._file: tuple[str, pq.ParquetFile, np.ndarray, object] | None = None  # one open file at a time
        self._cells: dict[tuple[str, int], object] = {}  # the last batch's cells

    def _open(self, path: str) -> tuple[pq.ParquetFile, np.ndarray]:
        if self._file is None or self._file[0] != path:
            if self._file is not None:
                self._file[3].close()
            raw = self.fs.open(path, "rb")
            handle = pq.ParquetFile(raw)
            meta = handle.metadata
            starts = np.cumsum([0] + [meta.row_group(g).num_rows for g in range(meta.num_row_groups)])
            self._file = (path, handle, starts, raw)
        return self._file[1], self._file[2]

    def fetch(self, rows: list[tuple[str, int]]) -> None:
        """Read these (file, row) cells together, grouped by file and row group; they replace the last batch."""
        cells: dict[tuple[str, int], object] = {}
        by_file: dict[str, list[int]] = {}
        for path, row in rows:
            by_file.setdefault(path, []).append(row)
        for path, wanted in by_file.items():
            handle, starts = self._open(path)
            wanted = sorted(set(wanted))
            groups = np.searchsorted(starts, wanted, side="right") - 1
            for g in np.unique(groups):
                in_group = [r for r, gr in zip(wanted, groups) if gr == g]
                column = handle.read_row_group(int(g), columns=[self.column]).column(0)
                taken = column.take(pa.array([r - int(starts[g]) for r in in_group], pa.int64())).to_pylist()
                cells.update({(path, r): v for r, v in zip(in_group, taken)})
        self._cells = cells

    def get(self, path: str, row: int) -> object:
        if (path, row) not in self._cells:
            self.fetch([(path, row)])
        return self._cells[(path, row)]


def _location(r: Record) -> tuple[str, int]:
    table, row = r.path.rsplit("#", 1)
    return table, int(row)


def _parquet_source(url: str, fs, tables: list[str]) -> ImageSource:
    with fs.open(tables[0], "rb") as f:
        schema = pq.read_schema(f)
    names = schema.names
    image_col = next((c for c in IMAGE_COLUMNS if c in names), None)
    label_col = next((c for c in LABEL_COLUMNS if c in names), None)
    if image_col is None or label_col is None:
        raise DataError(f"--data {url}: a Parquet table needs an encoded-image column (one of {', '.join(IMAGE_COLUMNS)}) "
                        f"and a label column (one of {', '.join(LABEL_COLUMNS)}); it has {', '.join(names)}")
    labels_raw: list = []
    locations: list[tuple[str, int]] = []
    for t in tables:
        column = _read_column(fs, t, label_col)
        labels_raw += column
        locations += [(t, i) for i in range(len(column))]
    if all(isinstance(v, int) for v in labels_raw):
        classes = [str(v) for v in sorted(set(labels_raw))]
        labels = labels_raw
    else:
        classes = sorted({str(v) for v in labels_raw})
        labels = [classes.index(str(v)) for v in labels_raw]
    records = [Record(i, f"{t}#{row}", lab) for i, ((t, row), lab) in enumerate(zip(locations, labels))]
    rows = ParquetRows(fs, image_col)

    def read(r: Record) -> bytes:
        value = rows.get(*_location(r))
        return value["bytes"] if isinstance(value, dict) else value

    return ImageSource(url, records, classes, read, prefetch=lambda records: rows.fetch([_location(r) for r in records]))
