"""The read stage: every line or row of every corpus file as one record (`schema.RAW_SCHEMA`: source_file,
row_number, text, reject_reason, reject_detail), or a reject saying why it is unreadable."""

from __future__ import annotations

from collections.abc import Iterator

import pyarrow as pa
from ray.data.datasource import FileBasedDatasource

from pipeline.corpus.records import read_records
from pipeline.corpus.storage import Corpus, format_of, open_corpus_file
from pipeline.run.schema import RAW_SCHEMA

RECORDS_PER_BLOCK = 1024


class CorpusDatasource(FileBasedDatasource):
    """Every line or row of every corpus file as one record, or as a reject saying why it is unreadable."""

    def __init__(self, corpus: Corpus):
        super().__init__(corpus.files, filesystem=corpus.location.arrow_fs())
        self._corpus = corpus

    def _format(self, path: str) -> str:
        return format_of(path, self._corpus.format_setting(path))

    def _open_input_source(self, filesystem, path, **open_args):
        if self._format(path) == "parquet":  # Parquet needs random access
            return filesystem.open_input_file(path)
        return open_corpus_file(self._corpus.location.fs, path)

    def _read_stream(self, f, path: str) -> Iterator[pa.Table]:  # the read stage
        source_file = self._corpus.location.url(path)
        rows = []
        for record in read_records(f, self._format(path)):
            rows.append(
                {"source_file": source_file, "row_number": record.row_number, "text": record.text,
                 "reject_reason": record.reason, "reject_detail": record.detail}
            )  # fmt: skip
            if len(rows) == RECORDS_PER_BLOCK:
                yield pa.Table.from_pylist(rows, schema=RAW_SCHEMA)
                rows = []
        if rows:
            yield pa.Table.from_pylist(rows, schema=RAW_SCHEMA)
