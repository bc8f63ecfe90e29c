"""Run-directory storage on local paths, s3:// and gs:// through pyarrow filesystems.

A stage writes into `<dir>/_attempt-<uuid>/`, then moves its files to `<dir>/` and writes
`<dir>/_SUCCESS` (a JSON manifest of the committed files) last. Readers trust only directories
with `_SUCCESS`, so a crash at any point leaves nothing that a rerun or a reader would count
twice: a rerun clears the unfinished directory and starts it again. Parquet readers (pyarrow,
pandas, Ray) skip names starting with `_`, so a finished directory reads as a plain dataset.
"""

from __future__ import annotations

import json
import os
import posixpath
import time
import uuid
from dataclasses import dataclass
from typing import Any

import pyarrow.fs as pafs

from igds_ray.errors import StageOutputError
from igds_ray.schema import SUCCESS

_STAGE_MARK = "_IGDS_STAGE"  # written when igds creates a directory; it may clear only those


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or a URI."""
    if "://" in uri:
        fs, path = pafs.FileSystem.from_uri(uri)
        return fs, path
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))


def join(uri: str, *parts: str) -> str:
    if "://" in uri:
        return posixpath.join(uri, *parts)
    return os.path.join(uri, *parts)


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_json(uri: str) -> Any:
    fs, path = filesystem(uri)
    with fs.open_input_stream(path) as f:
        return json.loads(f.read().decode())


def _json_safe(v: Any) -> Any:
    # NaN/inf are not JSON: strict readers (jq, browsers, other languages) reject them.
    if isinstance(v, float) and (v != v or v in (float("inf"), float("-inf"))):
        return None
    if isinstance(v, dict):
        return {k: _json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    return v


def write_json_atomic(uri: str, data: Any) -> None:
    """Write through a temporary name and move: readers never see half a file (local: atomic rename)."""
    fs, path = filesystem(uri)
    fs.create_dir(posixpath.dirname(path), recursive=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    with fs.open_output_stream(tmp) as f:
        f.write(json.dumps(_json_safe(data), indent=2, sort_keys=True, default=str, allow_nan=False).encode())
    fs.move(tmp, path)


@dataclass
class StageDir:
    """One stage's output directory and its commit protocol."""

    uri: str

    def __post_init__(self) -> None:
        self.fs, self.path = filesystem(self.uri)

    @property
    def success_uri(self) -> str:
        return join(self.uri, SUCCESS)

    def done(self) -> bool:
        return self.fs.get_file_info(posixpath.join(self.path, SUCCESS)).type == pafs.FileType.File

    def manifest(self) -> dict[str, Any]:
        if not self.done():
            raise StageOutputError(
                f"{self.uri} is not a finished stage directory (no {SUCCESS}): run the stage that writes it first"
            )
        return read_json(self.success_uri)

    def files(self) -> list[str]:
        """Committed files, as full URIs/paths."""
        return [join(self.uri, name) for name in self.manifest()["files"]]

    def begin(self, overwrite: bool = False) -> str | None:
        """Prepare a fresh attempt; returns its staging path, or None if the stage is already finished."""
        if self.done() and not overwrite:
            return None
        info = self.fs.get_file_info(self.path)
        if info.type == pafs.FileType.File:
            raise StageOutputError(f"{self.uri} is a file; a stage needs a directory there")
        if info.type == pafs.FileType.Directory:
            entries = self.fs.get_file_info(pafs.FileSelector(self.path))
            if entries and not any(posixpath.basename(e.path) == _STAGE_MARK for e in entries):
                raise StageOutputError(
                    f"{self.uri} is not empty and was not written by igds: refusing to clear it; choose another output"
                )
            # Leftovers of an unfinished (or, with overwrite, a finished) attempt.
            self.fs.delete_dir_contents(self.path)
        self.fs.create_dir(self.path, recursive=True)
        with self.fs.open_output_stream(posixpath.join(self.path, _STAGE_MARK)) as f:
            f.write(b"written by igds-ray; this directory may be cleared and rewritten by igds\n")
        staging = posixpath.join(self.path, f"_attempt-{uuid.uuid4().hex}")
        self.fs.create_dir(staging, recursive=True)
        return staging if "://" not in self.uri else self.uri.split("://")[0] + "://" + staging

    def commit(self, staging: str, manifest: dict[str, Any], suffix: str = ".parquet") -> dict[str, Any]:
        """Move the attempt's files into place, then write `_SUCCESS` last."""
        _, staging_path = filesystem(staging)
        staged = sorted(
            e.path
            for e in self.fs.get_file_info(pafs.FileSelector(staging_path, recursive=True))
            if e.type == pafs.FileType.File and e.path.endswith(suffix)
        )
        names = []
        for src in staged:
            name = posixpath.relpath(src, staging_path).replace("/", "__")
            self.fs.move(src, posixpath.join(self.path, name))
            names.append(name)
        self.fs.delete_dir(staging_path)
        manifest = dict(manifest, files=names, committed_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        write_json_atomic(self.success_uri, manifest)
        return manifest
