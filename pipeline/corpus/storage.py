"""Local and s3:// paths behind one fsspec filesystem, and the expansion of input paths to files."""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field

import fsspec
import fsspec.utils
import pyarrow.fs

from pipeline.run.config import ConfigError, InputConfig, StorageConfig, input_sources

EXTENSIONS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet", ".arrow": "arrow"}
# Hugging Face `save_to_disk` folders describe their Arrow shards in these files: not corpus files.
HF_DATASET_METADATA = ("dataset_info.json", "state.json", "dataset_dict.json")
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

    def path_of(self, url: str) -> str:
        """The path on `fs` of one of this location's URLs."""
        return url.removeprefix("s3://")

    def join(self, *parts: str) -> Location:
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


def file_version(info: dict) -> str:
    """What tells a file's content apart from its earlier content without reading it: its size with its
    ETag on S3, or with its modification time locally."""
    stamp = info.get("ETag") or info.get("mtime") or info.get("LastModified")
    return f"{info['size']}:{stamp}"


def expand_inputs(urls: list[str], storage: StorageConfig, configured_format: str) -> tuple[Location, dict[str, str], list[str]]:
    """Files named by `urls` (files, directories, globs), as (location, {file: `file_version`}, skipped
    files), from the listings (one request per folder on S3, not one per file).

    All inputs share one filesystem (all local or all on one S3 endpoint). A path that does not exist
    or matches nothing is an error; files in directories whose extension is not a corpus format are
    returned as skipped so that the job can report them.
    """
    locations = [locate(url, storage) for url in urls]
    if len({loc.scheme for loc in locations}) > 1:
        raise ConfigError("input.paths mixes local and s3:// paths; run them as separate jobs")
    files, skipped = {}, []
    for url, loc in zip(urls, locations):
        try:
            if any(ch in loc.path for ch in "*?["):
                matches = {p: info for p, info in loc.fs.glob(loc.path, detail=True).items() if info["type"] == "file"}
            elif loc.fs.isdir(loc.path):
                found = loc.fs.find(loc.path, detail=True)
                matches = {p: info for p, info in sorted(found.items()) if not os.path.basename(p).startswith((".", "_"))}
            elif loc.fs.isfile(loc.path):
                format_of(loc.path, configured_format)  # an explicitly named file must have a known format
                matches = {loc.path: loc.fs.info(loc.path)}
            else:
                matches = {}
        except (PermissionError, OSError) as exc:
            raise ConfigError(f"cannot read input path {url}: {exc}") from exc
        if not matches:
            raise ConfigError(f"input path not found or empty: {url}")
        hf_dataset = any(p.endswith(".arrow") for p in matches)
        for path, info in matches.items():
            known = configured_format != "auto" or _known_format(path) is not None
            if hf_dataset and os.path.basename(path) in HF_DATASET_METADATA:
                known = False
            if known:
                files[path] = file_version(info)
            else:
                skipped.append(path)
    if not files:
        raise ConfigError(f"no corpus files (.jsonl, .json, .parquet, JSON compressed as {COMPRESSIONS}) under {urls}")
    return locations[0], dict(sorted(files.items())), skipped


def _pattern_regex(pattern: str) -> re.Pattern:
    """`{name}` matches one path segment, `*` any characters within one, `**` any number of segments."""
    parts = re.split(r"(\{\w+\}|\*\*/?|\*|\?)", pattern)
    regex = ""
    for part in parts:
        if part.startswith("{"):
            regex += f"(?P<{part[1:-1]}>[^/]+)"
        elif part.startswith("**"):
            regex += "(?:.*/)?" if part.endswith("/") else ".*"
        elif part == "*":
            regex += "[^/]*"
        elif part == "?":
            regex += "[^/]"
        else:
            regex += re.escape(part)
    return re.compile(regex)


def path_field_values(urls: list[str], storage: StorageConfig, files: list[str], patterns: dict[str, str]) -> dict[str, dict]:
    """Per corpus file (by URL): the values `patterns` ({teacher: "{teacher}/*.json"}, or hive-style
    "teacher={teacher}/**") take in the file's path below the input path that holds it; None where a
    pattern does not match."""
    if not patterns:
        return {}
    roots = []
    for url in urls:
        location = locate(url, storage)
        root = location.path.split("*")[0].split("?")[0].split("[")[0]
        roots.append(root if location.fs.isdir(root) else os.path.dirname(root))
    regexes = {name: _pattern_regex(pattern) for name, pattern in patterns.items()}
    location = locate(urls[0], storage)
    values = {}
    for path in files:
        root = max((r for r in roots if path.startswith(r.rstrip("/") + "/")), key=len, default=os.path.dirname(path))
        relative = path[len(root.rstrip("/")) + 1 :]
        matches = {name: regex.fullmatch(relative) for name, regex in regexes.items()}
        values[location.url(path)] = {name: match[name] if match else None for name, match in matches.items()}
    return values


@dataclass(frozen=True)
class Corpus:
    """A run's corpus files, on one filesystem, each with the corpus part (`config.input_sources`) that
    names it and the values of that part's path fields; those a run reads (`files`) and those it leaves
    unread, unchanged since a run accounted for them (`unread`, `Corpus.leaving_unread`)."""

    location: Location
    files: list[str]  # paths on location.fs, read by the run
    skipped: list[str]  # files in the input folders that are not corpus files
    parts: list[InputConfig]
    part_of: dict[str, int]  # file URL -> index into parts
    path_values: dict[str, dict]  # file URL -> {path field: value}
    versions: dict[str, str] = field(default_factory=dict)  # file URL -> `file_version`, every corpus file
    unread: tuple[str, ...] = ()  # URLs of the corpus files the run leaves unread

    @property
    def urls(self) -> list[str]:
        """The URLs of the files the run reads."""
        return [self.location.url(path) for path in self.files]

    @property
    def file_order(self) -> list[str]:
        """Every corpus file in the order whose first row of an id wins (`stages.dedupe`): the files left
        unread first (their rows were committed first), then the files read, each in path order."""
        return [*self.unread, *self.urls]

    def leaving_unread(self, urls: set[str]) -> Corpus:
        """This corpus with the files `urls` left unread (those unread so far stay unread)."""
        unread = sorted({*self.unread, *urls})
        return dataclasses.replace(self, files=[p for p in self.files if self.location.url(p) not in urls], unread=tuple(unread))

    def reading(self, urls: set[str]) -> Corpus:
        """This corpus with the unread files `urls` read after all."""
        files = sorted([*self.files, *(self.location.path_of(url) for url in urls)])
        return dataclasses.replace(self, files=files, unread=tuple(u for u in self.unread if u not in urls))

    def format_setting(self, path: str) -> str:
        """The configured format of the part that names `path` (auto: by extension)."""
        return self.parts[self.part_of[self.location.url(path)]].format


def plan_corpus(input_cfg: InputConfig, storage: StorageConfig) -> Corpus:
    """Expand every corpus part's paths to files (`expand_inputs`); a file named by two parts is an error."""
    parts = input_sources(input_cfg)
    location, files, skipped, part_of, path_values, versions = None, [], [], {}, {}, {}
    for k, part in enumerate(parts):
        part_location, part_files, part_skipped = expand_inputs(part.paths, storage, part.format)
        if location is not None and part_location.scheme != location.scheme:
            raise ConfigError("the input parts mix local and s3:// paths; run them as separate jobs")
        location = location or part_location
        for path in part_files:
            url = location.url(path)
            if url in part_of:
                raise ConfigError(f"{url} is named by two input parts ({part_of[url]} and {k}): each file belongs to one")
            part_of[url] = k
            versions[url] = part_files[path]
        files += list(part_files)
        skipped += part_skipped
        path_values.update(path_field_values(part.paths, storage, part_files, part.path_fields))
    return Corpus(location, sorted(files), skipped, parts, part_of, path_values, versions)
