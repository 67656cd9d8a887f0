"""The tokenize stage, one per student i: schema.TOKENIZED (ids_i, positions_i, truncated_i,
content_dropped_i, reject_reason_i, reject_detail_i, skipped_i), rows already scored with the same
fingerprint skipped. A CPU stage, before the scoring actors."""

from __future__ import annotations

import pyarrow as pa

from pipeline.corpus.messages import messages_from_arrow
from pipeline.errors import RowError
from pipeline.run.schema import TOKENIZED, per_student, scored_key
from pipeline.run.stages.base import DatasetPlan, Stage, cached_get
from pipeline.scoring.models import StudentSource
from pipeline.tokens.scopes import DEFAULT_SCOPE
from pipeline.tokens.spans import encode_conversation


def tokenize_batch(
    batch: pa.Table,
    index: int,
    source: StudentSource,
    max_model_len: int,
    truncate: bool,
    reasoning: str,
    done_ref: list,
    scope: str = DEFAULT_SCOPE,
) -> pa.Table:
    """Encode every parsed row with student `index`'s chat template (a CPU stage, before the actors).

    Rows whose `sample_id/content_hash` key is in the set behind `done_ref` (a one-item list, so that
    Ray hands over the reference, not a copy per call) were scored with the same scoring fingerprint
    before: they are marked skipped and not encoded.
    """
    tokenizer = source.load_tokenizer()
    done = cached_get(done_ref[0])
    keys = [scored_key(s, h) for s, h in zip(batch["sample_id"].to_pylist(), batch["content_hash"].to_pylist())]
    skipped = [key in done for key in keys]
    ids, positions, truncated, dropped, reasons, details = [], [], [], [], [], []
    rows = zip(batch["reject_reason"].to_pylist(), batch["messages"], skipped, batch["sampled_out"].to_pylist())
    for reject, conversation, skip, sampled_out in rows:
        encoded = reason = detail = None
        if reject is None and not skip and not sampled_out:
            try:
                messages = messages_from_arrow(conversation.as_py())  # canonical and checked at parse time
                encoded = encode_conversation(tokenizer, messages, max_model_len, truncate, reasoning, scope, canonical=True)
            except RowError as exc:
                reason, detail = exc.reason, exc.detail
        ids.append(encoded.input_ids if encoded else None)
        positions.append(encoded.response_positions if encoded else None)
        truncated.append(encoded.truncated if encoded else None)
        dropped.append(encoded.content_dropped if encoded else None)
        reasons.append(reason)
        details.append(detail)
    values = {"ids": ids, "positions": positions, "truncated": truncated, "content_dropped": dropped,
              "reject_reason": reasons, "reject_detail": details, "skipped": skipped}  # fmt: skip
    for name, kind in TOKENIZED.items():
        batch = batch.append_column(per_student(name, index), pa.array(values[name], kind))
    return batch


def tokenize_stage(plan: DatasetPlan, index: int) -> Stage:
    settings = plan.settings
    student = settings.students[index]
    return Stage(
        f"tokenize {student.name}", tokenize_batch,
        ("sample_id", "content_hash", "reject_reason", "messages", "sampled_out"), tuple(per_student(c, index) for c in TOKENIZED),
        kwargs={"index": index, "source": student.source, "max_model_len": student.scoring.max_model_len,
                "truncate": settings.truncate, "reasoning": settings.reasoning, "scope": settings.scope,
                "done_ref": [plan.done_refs[index]]},
    )  # fmt: skip
