"""Local and s3:// paths behind one fsspec filesystem, and the expansion of input paths to files."""

from __future__ import annotations

import os
from dataclasses import dataclass

import fsspec
import fsspec.utils
import pyarrow.fs

from pipeline.config import ConfigError, StorageConfig

EXTENSIONS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet"}
# JSONL and JSON files may be compressed; fsspec decompresses them by extension.
COMPRESSIONS = (".gz", ".zst", ".bz2", ".xz")


@dataclass(frozen=True)
class Location:
    """A filesystem and a path on it without the scheme (`bucket/key` on S3, absolute locally)."""

    fs: fsspec.AbstractFileSystem
    path: str
    scheme: str  # "s3" or "file"

    def url(self, path: str | None = None) -> str:
        path = self.path if path is None else path
        return f"s3://{path}" if self.scheme == "s3" else path

    def join(self, *parts: str) -> "Location":
        return Location(self.fs, "/".join([self.path.rstrip("/"), *parts]), self.scheme)

    def arrow_fs(self) -> pyarrow.fs.FileSystem:
        """The same filesystem for Ray Data and pyarrow readers and writers."""
        if self.scheme == "file":
            return pyarrow.fs.LocalFileSystem()
        return pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(self.fs))


class StorageError(RuntimeError):
    """Storage that cannot be used as configured (missing bucket, access denied); nothing was committed."""


def check_output(root: Location) -> None:
    """Fail before any work when the output's bucket is missing or unreadable (it is never created)."""
    if root.scheme != "s3":
        return
    bucket = root.path.split("/", 1)[0]
    try:
        root.fs.info(bucket)  # unlike exists(), says which: not found or forbidden
    except FileNotFoundError as exc:
        raise StorageError(f"output bucket s3://{bucket} does not exist (it is not created for you)") from exc
    except (PermissionError, OSError) as exc:
        raise StorageError(f"cannot access output {root.url()}: {type(exc).__name__}: {exc}") from exc


def locate(url: str, storage: StorageConfig) -> Location:
    if url.startswith("s3://"):
        client_kwargs = {"region_name": storage.region} if storage.region else {}
        fs = fsspec.filesystem("s3", endpoint_url=storage.endpoint_url, client_kwargs=client_kwargs, use_listings_cache=False)
        return Location(fs, url[len("s3://") :].rstrip("/"), "s3")
    if "://" in url and not url.startswith("file://"):
        raise ConfigError(f"unsupported path scheme in {url!r}: use a local path or s3://")
    return Location(fsspec.filesystem("file"), os.path.abspath(url.removeprefix("file://")), "file")


def _known_format(path: str) -> str | None:
    for compression in COMPRESSIONS:
        path = path.removesuffix(compression)
    return next((fmt for extension, fmt in EXTENSIONS.items() if path.endswith(extension)), None)


def format_of(path: str, configured: str) -> str:
    fmt = configured if configured != "auto" else _known_format(path)
    if fmt is None:
        raise ConfigError(f"cannot tell the format of {path!r} from its extension: set input.format")
    if fmt == "parquet" and path.endswith(COMPRESSIONS):
        raise ConfigError(f"{path!r}: Parquet compresses inside the file; an outer compression cannot be read")
    return fmt


def open_corpus_file(fs: fsspec.AbstractFileSystem, path: str):
    """A binary stream of a corpus file, decompressed when its extension names a compression."""
    return fs.open(path, "rb", compression=fsspec.utils.infer_compression(path))


def expand_inputs(urls: list[str], storage: StorageConfig, configured_format: str) -> tuple[Location, list[str], list[str]]:
    """Files named by `urls` (files, directories, globs), as (location, files, skipped files).

    All inputs share one filesystem (all local or all on one S3 endpoint). A path that does not exist
    or matches nothing is an error; files in directories whose extension is not a corpus format are
    returned as skipped so that the job can report them.
    """
    locations = [locate(url, storage) for url in urls]
    if len({loc.scheme for loc in locations}) > 1:
        raise ConfigError("input.paths mixes local and s3:// paths; run them as separate jobs")
    files, skipped = [], []
    for url, loc in zip(urls, locations):
        try:
            if any(ch in loc.path for ch in "*?["):
                matches = [p for p in loc.fs.glob(loc.path) if loc.fs.isfile(p)]
            elif loc.fs.isdir(loc.path):
                matches = sorted(p for p in loc.fs.find(loc.path) if not os.path.basename(p).startswith((".", "_")))
            elif loc.fs.isfile(loc.path):
                format_of(loc.path, configured_format)  # an explicitly named file must have a known format
                matches = [loc.path]
            else:
                matches = []
        except (PermissionError, OSError) as exc:
            raise ConfigError(f"cannot read input path {url}: {exc}") from exc
        if not matches:
            raise ConfigError(f"input path not found or empty: {url}")
        for path in matches:
            known = configured_format != "auto" or _known_format(path) is not None
            (files if known else skipped).append(path)
    if not files:
        raise ConfigError(f"no corpus files (.jsonl, .json, .parquet, JSON compressed as {COMPRESSIONS}) under {urls}")
    return locations[0], sorted(set(files)), skipped
