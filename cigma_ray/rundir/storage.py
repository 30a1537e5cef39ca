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

    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def exists(self, *parts: str) -> bool:
        return self.fs.exists(self.path(*parts))

    def list(self, folder: str, suffix: str = ".parquet") -> list[str]:
        """Names (not paths) of the finished files in a folder, sorted; temporaries are ignored."""
        p = self.path(folder)
        self.fs.invalidate_cache(p)  # other processes write here: never trust a cached listing
        if not self.fs.exists(p):
            return []
        names = [posixpath.basename(x.rstrip("/")) for x in self.fs.ls(p, detail=False)]
        return sorted(n for n in names if n.endswith(suffix) and not n.startswith("."))

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
        buf = pa.BufferOutputStream()
        pq.write_table(table, buf, compression="zstd")
        return self.write_bytes(rel, buf.getvalue().to_pybytes())

    def read_table(self, rel: str, columns: list[str] | None = None) -> pa.Table:
        # An Arrow buffer, not io.BytesIO: a Python file object lets pyarrow's reader threads take the GIL
        # during interpreter shutdown, which aborted short commands like `status` now and then.
        return pq.read_table(pa.BufferReader(self.read_bytes(rel)), columns=columns)

    def read_folder(self, folder: str, columns: list[str] | None = None, names: list[str] | None = None) -> pa.Table:
        """All finished Parquet files of a folder as one table (in file-name order)."""
        names = self.list(folder) if names is None else names
        tables = [self.read_table(posixpath.join(folder, n), columns) for n in names]
        return pa.concat_tables(tables) if tables else None

    def remove(self, rel: str) -> None:
        if self.exists(rel):
            self.fs.rm(self.path(rel), recursive=True)
