"""The run directory (DESIGN section 3): Parquet and JSON files under one URL, through fsspec.

Every file is written whole and atomically: to a temporary name and renamed on local disks, as
one PUT on object storage. A unit's file name derives from the unit, so a retried unit
overwrites itself and resuming is "list what exists, skip it".
"""
from __future__ import annotations

import hashlib
import json
import os
import posixpath
import uuid
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem


class StorageError(ValueError):
    """A run directory that cannot be used; the message names the URL and the fix."""


RECEIPTS = "receipts"


def receipt_file(rel: str) -> str:
    """Where the receipt of the unit file `rel` is kept."""
    return f"{RECEIPTS}/{rel}.json"


def table_bytes(table: pa.Table) -> bytes:
    """A table as the bytes of a Parquet file (zstd)."""
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue().to_pybytes()


def parse_table(data: bytes, columns: list[str] | None = None, where: str = "") -> pa.Table:
    """A Parquet file's bytes as a table; a truncated or damaged file is a StorageError naming it and the fix."""
    try:
        # An Arrow buffer, not io.BytesIO: a Python file object lets pyarrow's reader threads take the GIL
        # during interpreter shutdown, which aborted short commands like `status` now and then.
        parquet = pq.ParquetFile(pa.BufferReader(data))
        missing = [c for c in columns or () if c not in parquet.schema_arrow.names]
        if missing:
            raise StorageError(f"{where} has no column {', '.join(missing)} (it has "
                               f"{', '.join(parquet.schema_arrow.names)}); was the run made by another version of "
                               "cigma-ray?")
        return parquet.read(columns=columns)
    except pa.ArrowException as e:
        reason = str(e).split(". ")[0].removeprefix("Could not open Parquet input source '<Buffer>': ")
        raise StorageError(f"{where} is damaged ({len(data)} bytes, not a whole Parquet file: {reason}); the scan "
                           "command that made the run redoes a damaged unit (`cigma-ray status RUN` lists them)"
                           ) from None


def location(url: str, label: str = "--out") -> tuple[str, str]:
    """Where a URL points, comparable across spellings: ("file", the real path: symlinks and .. resolved) for
    a local path, (protocol, "bucket/key" without slashes at either end) for object storage."""
    try:
        fs, root = fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as e:
        raise StorageError(f"{label} {url}: {e}") from None
    if isinstance(fs, LocalFileSystem):
        return "file", os.path.realpath(root)
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol, posixpath.normpath("/" + root.strip("/")).lstrip("/")


def within(inner: str, outer: str) -> bool:
    """Whether URL `inner` is `outer` or lies under it (same filesystem, path prefix by whole components)."""
    (fs_in, path_in), (fs_out, path_out) = location(inner), location(outer)
    return fs_in == fs_out and (path_in == path_out or path_in.startswith(path_out.rstrip("/") + "/"))


def check_out(out: str, data: list[str] | tuple[str, ...] = (), data_label: str = "--data",
              out_label: str = "--out", existing_file: bool = True) -> None:
    """Before anything is written: `out` is no existing local file (with `existing_file`), and lies neither at
    nor under any of the `data` URLs (a run's Parquet files among the images would make the folder a Parquet
    table next time). Object storage is compared by bucket and key prefix, without a request."""
    kind, path = location(out, out_label)
    if existing_file and kind == "file" and os.path.isfile(path):
        raise StorageError(f"{out_label} {out} is an existing file; a run is a directory: give a new directory, or "
                           "an existing run to resume it")
    for url in data:
        location(url, data_label)
        if within(out, url):
            where = "is" if location(out)[1] == location(url)[1] else "is inside"
            fix = (f"choose an {out_label} outside {url}" if out_label.startswith("--") else
                   "evaluate on images that do not hold the run")
            raise StorageError(f"{out_label} {out} {where} {data_label} {url}: the run's files (run.json, "
                               f"predictions/, masks/, deltas/, eval/) would be written among the images; {fix}")


class RunDir:
    """A run directory at a local path or fsspec URL."""

    def __init__(self, url: str):
        self.url = url
        try:
            self.fs, self.root = fsspec.core.url_to_fs(url)
        except (ImportError, ValueError) as e:
            raise StorageError(f"--out {url}: {e}") from None
        self.local = isinstance(self.fs, LocalFileSystem)
        if self.local:
            self.root = os.path.abspath(self.root)

    def check(self, label: str = "--out") -> None:
        """Fail early on object storage that cannot be reached: no bucket, no credentials."""
        if self.local:
            if os.path.isfile(self.root):
                raise StorageError(f"{label} {self.url} is an existing file; a run is a directory: give a new "
                                   "directory, or an existing run to resume it")
            return
        bucket = self.root.split("/", 1)[0]
        try:
            self.fs.ls(bucket, refresh=True)
        except FileNotFoundError:
            raise StorageError(f"{label} {self.url}: bucket {bucket!r} does not exist; create it first") from None
        except PermissionError as e:
            raise StorageError(f"{label} {self.url}: access to bucket {bucket!r} denied ({e}); check the credentials' permissions") from None
        except Exception as e:  # noqa: BLE001 - botocore raises credential errors of several types
            if "credential" in f"{type(e).__name__} {e}".lower():
                raise StorageError(f"{label} {self.url}: no usable credentials ({e}); set AWS_ACCESS_KEY_ID and "
                                   "AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or run where an instance role applies") from None
            raise StorageError(f"{label} {self.url}: cannot reach the bucket ({type(e).__name__}: {e}); for an S3-compatible "
                               "store set AWS_ENDPOINT_URL") from None
        if self.root.strip("/") != bucket and self.fs.isfile(self.root):
            raise StorageError(f"{label} {self.url} is an existing object; a run is a prefix (a directory): give a new "
                               "one, or an existing run to resume it")

    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def exists(self, *parts: str) -> bool:
        return self.fs.exists(self.path(*parts))

    def list(self, folder: str, suffix: str = ".parquet", recursive: bool = False) -> list[str]:
        """Names (not paths) of the finished files in a folder, sorted; temporaries are ignored. With
        `recursive`, the paths below the folder (e.g. "deltas/round-01/part-00000.parquet.json" under receipts)."""
        p = self.path(folder)
        self.fs.invalidate_cache(p)  # other processes write here: never trust a cached listing
        if not self.fs.exists(p):
            return []
        if recursive:
            names = [posixpath.relpath(x, p) for x in self.fs.find(p)]
        else:
            names = [posixpath.basename(x.rstrip("/")) for x in self.fs.ls(p, detail=False)]
        return sorted(n for n in names if n.endswith(suffix) and not posixpath.basename(n).startswith("."))

    def write_bytes(self, rel: str, data: bytes) -> str:
        """Write a whole file atomically; returns its sha256 (the receipt's checksum)."""
        target = self.path(rel)
        if self.local:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            tmp = posixpath.join(os.path.dirname(target), f".{os.path.basename(target)}.{uuid.uuid4().hex}.tmp")
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        else:
            self.fs.pipe_file(target, data)
        return hashlib.sha256(data).hexdigest()

    def read_bytes(self, rel: str) -> bytes:
        return self.fs.cat_file(self.path(rel))

    def write_json(self, rel: str, obj: Any) -> str:
        return self.write_bytes(rel, json.dumps(obj, indent=2, sort_keys=True).encode())

    def read_json(self, rel: str) -> Any:
        return json.loads(self.read_bytes(rel))

    def write_table(self, rel: str, table: pa.Table) -> str:
        return self.write_bytes(rel, table_bytes(table))

    def read_table(self, rel: str, columns: list[str] | None = None) -> pa.Table:
        return parse_table(self.read_bytes(rel), columns, posixpath.join(self.url, rel))

    # -- unit files and their receipts ---------------------------------------------------------
    def write_unit(self, rel: str, table: pa.Table) -> dict:
        """A unit's file, then its receipt (receipts/FILE.json: sha256, bytes, rows), each written whole. A unit
        is done when its file is there and matches its receipt (`check_units`)."""
        data = table_bytes(table)
        receipt = {"file": rel, "sha256": self.write_bytes(rel, data), "bytes": len(data), "rows": table.num_rows}
        self.write_json(receipt_file(rel), receipt)
        return receipt

    def check_units(self, files: list[str], adopt: bool = False) -> dict[str, str]:
        """{file: why it is damaged} of the given unit files (which exist): each is read whole and its sha256
        compared with its receipt's. A file without a receipt (a run made before receipts were kept, or a crash
        between the two writes) counts as whole when it parses completely as Parquet; with `adopt` its receipt
        is written then, so the next check compares checksums."""
        damaged = {}
        receipts = set(self.list(RECEIPTS, suffix=".json", recursive=True))
        for rel, data in self._read_many(files):
            want = self._receipt(rel) if f"{rel}.json" in receipts else None
            if want is not None:
                got = hashlib.sha256(data).hexdigest()
                if got != want.get("sha256"):
                    damaged[rel] = (f"checksum mismatch ({len(data)} bytes, its receipt says {want.get('bytes')})"
                                    if len(data) != want.get("bytes") else "checksum mismatch")
                continue
            try:
                table = parse_table(data, None, posixpath.join(self.url, rel))
            except StorageError:
                damaged[rel] = f"not a whole Parquet file ({len(data)} bytes) and no receipt"
                continue
            if adopt:
                self.write_json(receipt_file(rel), {"file": rel, "sha256": hashlib.sha256(data).hexdigest(),
                                                    "bytes": len(data), "rows": table.num_rows})
        return damaged

    def _receipt(self, rel: str) -> dict | None:
        try:
            receipt = self.read_json(receipt_file(rel))
        except (ValueError, FileNotFoundError):  # not JSON (damaged itself), or gone since the listing
            return None
        return receipt if isinstance(receipt, dict) else None

    def _read_many(self, files: list[str], batch: int = 32):
        """(file, bytes) of each file; object storage reads a batch of files concurrently."""
        for i in range(0, len(files), batch):
            chunk = files[i: i + batch]
            if self.local or len(chunk) == 1:
                yield from ((rel, self.read_bytes(rel)) for rel in chunk)
            else:
                paths = {self.path(rel): rel for rel in chunk}
                got = self.fs.cat(list(paths), on_error="raise")
                yield from ((rel, got[path]) for path, rel in paths.items())

    def read_folder(self, folder: str, columns: list[str] | None = None, names: list[str] | None = None) -> pa.Table:
        """All finished Parquet files of a folder as one table (in file-name order)."""
        names = self.list(folder) if names is None else names
        tables = [self.read_table(posixpath.join(folder, n), columns) for n in names]
        return pa.concat_tables(tables) if tables else None

    def remove(self, rel: str) -> None:
        if self.exists(rel):
            self.fs.rm(self.path(rel), recursive=True)
