"""Image sources (data/): ImageFolder and Parquet listings, labels, bad data, the demo data generator."""
from __future__ import annotations

import io
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from fsspec.implementations.local import LocalFileSystem
from PIL import Image

from cigma_ray.data import DataError, open_source
from cigma_ray.data.demo import CLASSES, SPLITS, ensure_demo_data, make_image
from cigma_ray.data.sources import ParquetRows
from cigma_ray.pipeline import Pipeline
from cigma_ray.rundir import RunDir

from helpers import job, rankings, write_folder


def test_parquet_source_with_string_and_integer_labels(tmp_path, tiny_checkpoint):
    rng = np.random.default_rng(0)
    blobs, names = [], []
    for i in range(30):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, format="PNG")
        blobs.append(buf.getvalue())
        names.append(["cat", "dog", "eel"][i % 3])
    blobs[4] = b"broken"
    pq.write_table(pa.table({"image": blobs, "label": names}), tmp_path / "words.parquet")
    src = open_source(str(tmp_path / "words.parquet"))
    assert src.classes == ["cat", "dog", "eel"] and [r.label for r in src.records][:4] == [0, 1, 2, 0]
    pq.write_table(pa.table({"image": [{"bytes": b, "path": None} for b in blobs], "label": [i % 3 for i in range(30)]}),
                   tmp_path / "ints.parquet")
    p = Pipeline(job(tmp_path, str(tmp_path / "ints.parquet"), tiny_checkpoint), progress=False)
    p.run_all()
    failures = RunDir(p.job.out).read_folder("failures")
    assert failures["path"].to_pylist() == [f"{tmp_path / 'ints.parquet'}#4"]
    assert rankings(p.job.out).num_rows == len(p.adapter.heads)


def test_bad_data_is_named(tmp_path, tiny_checkpoint):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no images found"):
        open_source(str(empty))
    with pytest.raises(DataError, match="does not exist"):
        open_source(str(tmp_path / "missing"))
    (tmp_path / "table.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="must be a .parquet"):
        open_source(str(tmp_path / "table.csv"))
    pq.write_table(pa.table({"pixels": [b"x"], "y": [1]}), tmp_path / "cols.parquet")
    with pytest.raises(DataError, match="image column"):
        open_source(str(tmp_path / "cols.parquet"))
    four = write_folder(tmp_path / "four", classes=("a", "b", "c", "d"), per_class=1)
    with pytest.raises(DataError, match="has 4 classes but .* outputs 3"):
        Pipeline(job(tmp_path, four, tiny_checkpoint), progress=False)
    numbered = write_folder(tmp_path / "numbered", classes=("0", "2", "7"), per_class=1)
    with pytest.raises(DataError, match="class index 7"):
        Pipeline(job(tmp_path, numbered, tiny_checkpoint), progress=False)
    assert not (tmp_path / "run").exists()  # nothing written before the checks


def test_numbered_class_folders_map_to_model_indices(tmp_path):
    src = open_source(write_folder(tmp_path / "n", classes=("10", "2"), per_class=2))
    assert src.classes == ["2", "10"] and sorted({r.label for r in src.records}) == [2, 10]


def test_demo_data_is_deterministic_and_in_imagefolder_layout(tmp_path):
    a = ensure_demo_data(tmp_path / "a", splits=("aligned",))
    b = ensure_demo_data(tmp_path / "b", splits=("aligned",))
    files = sorted(p.relative_to(a["aligned"]) for p in a["aligned"].rglob("*.png"))
    assert len(files) == SPLITS["aligned"].size
    assert sorted(os.listdir(a["aligned"])) == sorted(CLASSES)
    for rel in files[:20]:
        assert (a["aligned"] / rel).read_bytes() == (b["aligned"] / rel).read_bytes()
    import numpy as np

    img = make_image(np.random.default_rng(0), 0, 1)
    assert img.shape == (64, 64, 3) and img.dtype == np.uint8


class CountingFileSystem(LocalFileSystem):
    """The local file system, counting the bytes read through it (to see what a read costs)."""

    bytes_read = 0

    def _open(self, path, mode="rb", **kwargs):
        f = super()._open(path, mode, **kwargs)
        read = f.read

        def counted(*args):
            data = read(*args)
            CountingFileSystem.bytes_read += len(data)
            return data

        f.read = counted
        return f


def test_parquet_images_are_read_by_row_group_not_by_whole_column(tmp_path):
    rng = np.random.default_rng(1)
    blobs = []
    for i in range(200):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(buf, format="PNG")
        blobs.append(buf.getvalue())
    path = tmp_path / "big.parquet"
    pq.write_table(pa.table({"image": blobs, "label": [i % 4 for i in range(200)]}), path, row_group_size=20,
                   compression="none")
    source = open_source(str(path))
    rows = ParquetRows(CountingFileSystem(), "image")
    wanted = [(str(path), r) for r in (41, 3, 45, 199)]  # three row groups of ten
    rows.fetch(wanted)
    assert [rows.get(*w) for w in wanted] == [blobs[41], blobs[3], blobs[45], blobs[199]]
    three_groups, CountingFileSystem.bytes_read = CountingFileSystem.bytes_read, 0
    with CountingFileSystem().open(str(path), "rb") as f:  # the whole image column, as a naive reader would
        pq.read_table(f, columns=["image"])
    assert three_groups < 0.5 * CountingFileSystem.bytes_read  # 3 of 10 row groups (and the footer)
    # the source serves any records, in any order, across row groups
    records = [source.records[i] for i in (150, 2, 77, 78, 19)]
    images, ok, failed = source.load(records, lambda img: torch.from_numpy(np.asarray(img).copy()))
    assert not failed and [r.image_id for r in ok] == [150, 2, 77, 78, 19]
    for image, r in zip(images, ok):
        expected = np.asarray(Image.open(io.BytesIO(blobs[r.image_id])).convert("RGB"))
        assert (image.numpy() == expected).all()


class FlakyFileSystem(LocalFileSystem):
    """The local file system behind a `flaky://` URL, whose reads of chosen files fail a number of times first, as a
    flaky object store's GETs do (a connection reset); every other operation is the local file system's."""

    protocol = "flaky"
    fail: dict[str, int] = {}  # path -> failures left
    reads: dict[str, int] = {}

    @classmethod
    def _strip_protocol(cls, path):
        path = str(path)
        return super()._strip_protocol(path[len("flaky://"):] if path.startswith("flaky://") else path)

    def cat_file(self, path, start=None, end=None, **kwargs):
        p = self._strip_protocol(path)
        FlakyFileSystem.reads[p] = FlakyFileSystem.reads.get(p, 0) + 1
        if FlakyFileSystem.fail.get(p, 0) > 0:
            FlakyFileSystem.fail[p] -= 1
            raise ConnectionResetError(f"[Errno 104] Connection reset by peer (reading {p})")
        return super().cat_file(path, start, end, **kwargs)


def test_a_storage_read_that_fails_twice_fails_the_unit_and_loses_no_image(tmp_path, image_folder, tiny_checkpoint,
                                                                         fast_run_dir):
    """A transient read error counted as an unreadable image: the image left D for good. Now it fails the unit, which
    is tried again (max_attempts 3), and D, the failures and the ranking are those of an undisturbed run."""
    import fsspec

    fsspec.register_implementation("flaky", FlakyFileSystem, clobber=True)
    reference = RunDir(fast_run_dir)
    d = sorted(reference.read_folder("masks")["image_id"].to_pylist())
    victim = open_source(image_folder).records[d[0]].path
    FlakyFileSystem.fail, FlakyFileSystem.reads = {victim: 2}, {}
    p = Pipeline(job(tmp_path, f"flaky://{image_folder}", tiny_checkpoint), progress=False)
    p.run_all()
    assert FlakyFileSystem.fail[victim] == 0 and FlakyFileSystem.reads[victim] >= 3  # two failed attempts, then one
    run = RunDir(p.job.out)
    assert sorted(run.read_folder("masks")["image_id"].to_pylist()) == d
    assert run.read_folder("failures")["path"].to_pylist() == [os.path.join(image_folder, "a", "zz_broken.png")]
    assert rankings(p.job.out).select(["layer", "head", "rank"]).equals(rankings(fast_run_dir).select(["layer", "head", "rank"]))
    np.testing.assert_allclose(rankings(p.job.out)["score"].to_numpy(), rankings(fast_run_dir)["score"].to_numpy(),
                               rtol=0, atol=1e-9)

    # a read that keeps failing fails its unit for good (recorded, the command exits 1), never the image
    from cigma_ray.pipeline import UnitsFailed

    FlakyFileSystem.fail = {victim: 10}
    p = Pipeline(job(tmp_path, f"flaky://{image_folder}", tiny_checkpoint, name="down"), progress=False)
    with pytest.raises(UnitsFailed, match="ConnectionResetError"):
        p.run_all()
    failures = RunDir(p.job.out).read_folder("failures").to_pylist()
    assert [(f["kind"], f["stage"], f["attempts"]) for f in failures if f["kind"] == "unit"] == [("unit", "predict", 3)]
    assert victim not in [f["path"] for f in failures]
