"""What earlier runs committed, read by Ray tasks (the driver never holds it): the keys scored with a
fingerprint (the tokenize stage skips them) and the rejects (checkpoints do not count them twice)."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.dataset as pads
import ray

from pipeline.corpus.storage import Location
from pipeline.run.schema import REJECT_KEY_COLUMNS, reject_keys, scored_key


@ray.remote
def scored_keys(paths: list[str], location: Location, fingerprint: str) -> set[str]:
    """`scored_key` of every trajectory scored with the scoring fingerprint `fingerprint` in the
    committed files `paths` (a task: the driver never holds them). Files written before fingerprints
    existed lack the column: their rows count as scored with other settings."""
    if not paths:
        return set()
    schema = pa.schema([("sample_id", pa.string()), ("content_hash", pa.string()), ("scoring_fingerprint", pa.string())])
    table = pads.dataset(paths, schema=schema, filesystem=location.arrow_fs(), format="parquet").to_table(
        filter=pads.field("scoring_fingerprint") == fingerprint
    )
    return {scored_key(s, h) for s, h in zip(table["sample_id"].to_pylist(), table["content_hash"].to_pylist())}


@ray.remote
def committed_reject_keys(paths: list[str], location: Location) -> set[str]:
    """`reject_key` of every reject in the committed files `paths` (a task: the driver never holds them)."""
    if not paths:
        return set()
    table = pads.dataset(paths, filesystem=location.arrow_fs(), format="parquet").to_table(columns=REJECT_KEY_COLUMNS)
    return set(reject_keys(table))
