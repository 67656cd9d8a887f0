"""Each stage function on a few-row Arrow table, without Ray: its output has exactly the columns its
declaration in its `pipeline/run/stages/` module says, and does what it says to the rows."""

import hashlib
import json
import subprocess
import sys
from datetime import UTC, datetime

import pyarrow as pa
import pytest

from pipeline import errors
from pipeline.corpus.messages import canonical_messages, messages_from_arrow
from pipeline.corpus.records import canonical_json, content_hash
from pipeline.corpus.storage import Corpus, locate
from pipeline.run.config import ConfigError, InputConfig, SampleConfig, load_config
from pipeline.run.dataset import scoring_stages
from pipeline.run.output import rejects_batch, scores_batch
from pipeline.run.results import Tally, measure_block
from pipeline.run.schema import RAW_SCHEMA, REJECT_COLUMNS, RowContract, ScoringSettings, Status, reject_key, scored_key
from pipeline.run.settings import RunSettings, StudentCheck, resolve_settings
from pipeline.run.stages.base import DatasetPlan, RunStamp, Stage, check_stages, row_order
from pipeline.run.stages.dedupe import reject_duplicates
from pipeline.run.stages.explode import explode_batch
from pipeline.run.stages.parse import parse_batch
from pipeline.run.stages.sample import mark_sampled_out
from pipeline.run.stages.tokenize import tokenize_batch
from pipeline.run.survey import (
    REPEATED_IDS,
    CorpusSurvey,
    GroupSample,
    choose_groups,
    order_batch,
    repeated_ids,
    row_column_types,
)
from pipeline.scoring.models import StudentSource
from tests.conftest import REPO

GOOD = [{"role": "user", "content": "Two and two?"}, {"role": "assistant", "content": "Four."}]


@pytest.fixture
def cfg(tmp_path, student_dirs):
    config = tmp_path / "job.yaml"
    config.write_text(json.dumps({
        "input": {"paths": ["unused"], "passthrough": ["source"]},
        "students": [{"name": "tiny", "path": str(student_dirs["chatml"]), "dtype": "float32"}],
        "output": {"path": str(tmp_path / "out"), "partition_by": ["source"]},
    }))  # fmt: skip
    return load_config(config)


def corpus_of(cfg) -> Corpus:
    return Corpus(locate("/c", None), ["/c/a.jsonl"], [], [cfg.input], {"/c/a.jsonl": 0}, {})


def run_settings(cfg) -> RunSettings:
    check = StudentCheck(StudentSource(cfg.students[0].path), "", "", 4096, 4096, "rev")
    return resolve_settings(cfg, RowContract.of(cfg), [check], cluster_gpus=0)


def stages(cfg) -> list[Stage]:
    plan = DatasetPlan(cfg, run_settings(cfg), RowContract.of(cfg), corpus_of(cfg), CorpusSurvey(REPEATED_IDS.empty_table(), 0, 0, {}),
                       RunStamp("run-1", datetime.now(UTC)), done_refs=(None,))  # fmt: skip
    return scoring_stages(plan)


def stage(cfg, name) -> Stage:
    return next(s for s in stages(cfg) if s.name.startswith(name))


def assert_declared(before: pa.Table, after: pa.Table, declared: Stage):
    assert set(after.column_names) == declared.output(set(before.column_names)), declared.name
    assert set(declared.reads) <= set(before.column_names), declared.name


def raw(rows) -> pa.Table:
    return pa.Table.from_pylist(
        [{"source_file": "/c/a.jsonl", "row_number": n, "text": text, "reject_reason": reason, "reject_detail": None}
         for n, (text, reason) in enumerate(rows, start=1)],
        schema=RAW_SCHEMA,
    )  # fmt: skip


def parsed(cfg) -> pa.Table:
    corpus = corpus_of(cfg)
    rows = [
        (json.dumps({"id": "a", "source": "t1", "messages": GOOD}), None),
        (json.dumps({"id": "b", "source": "t2"}), None),  # no messages
        (None, errors.BLANK_LINE),
        (json.dumps({"id": "a", "source": "t1", "messages": GOOD}), None),  # a repeated id
    ]
    return parse_batch(raw(rows), corpus, ["source"], {})


def test_parse(cfg):
    before = raw([(json.dumps({"id": "a", "messages": GOOD}), None)])
    after = parsed(cfg)
    assert_declared(before, after, stage(cfg, "parse"))
    assert after["reject_reason"].to_pylist() == [None, errors.MISSING_MESSAGES, errors.BLANK_LINE, None]
    assert after["sample_id"].to_pylist()[:2] == ["a", "b"] and after["source"].to_pylist()[:2] == ["t1", "t2"]


def test_messages_travel_as_arrow_data_and_come_back_key_for_key(cfg):
    """What the tokenize stage reads back is the canonical messages the parse stage hashed: the same keys
    (a null content kept, absent keys absent), tool keys of any JSON type, and the same content_hash."""
    agentic = [
        {"role": "system", "content": "Use tools."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "reasoning_content": "I should call it.",
         "tool_calls": [{"type": "function", "function": {"name": "weather", "arguments": {"city": "Paris", "days": [1, 2]}}}]},
        {"role": "tool", "content": "18C", "tool_call_id": 7, "name": "weather"},
        {"role": "assistant", "content": "It is 18C."},
    ]  # fmt: skip
    table = parse_batch(raw([(json.dumps({"id": "x", "messages": agentic}), None)]), corpus_of(cfg), [], {})
    (conversation,) = table["messages"].to_pylist()
    assert messages_from_arrow(conversation) == canonical_messages(agentic) == agentic
    assert [list(m) for m in messages_from_arrow(conversation)] == [list(m) for m in canonical_messages(agentic)]  # key order too
    assert table["content_hash"].to_pylist() == [content_hash(agentic)]
    assert table["text_bytes"].to_pylist() == [len(canonical_json(agentic))]


def test_survey_and_dedupe(cfg):
    table = parsed(cfg)
    orders = order_batch(table, {"/c/a.jsonl": 0}, [], ["source"])
    assert orders["source"].to_pylist() == table["source"].to_pylist()  # for the row columns' types
    grouped = (
        orders.group_by("sample_id")
        .aggregate([("valid", "sum"), ("order", "min")])
        .rename_columns(["sample_id", "sum(valid)", "min(order)"])
    )
    repeated = repeated_ids(grouped)
    assert repeated.to_pylist() == [{"sample_id": "a", "min(order)": row_order(0, 1)}]
    first_rows = dict(zip(repeated["sample_id"].to_pylist(), repeated["min(order)"].to_pylist()))
    after = reject_duplicates(table, first_rows, ["/c/a.jsonl"])
    assert_declared(table, after, stage(cfg, "dedupe"))
    assert after["reject_reason"].to_pylist() == [None, errors.MISSING_MESSAGES, errors.BLANK_LINE, errors.DUPLICATE_ID]


def test_sample(cfg):
    table = parsed(cfg)
    survey = CorpusSurvey(REPEATED_IDS.empty_table(), 4, 0, {}, GroupSample(2, frozenset({"t2"})))  # t2 chosen
    after = mark_sampled_out(table, "source", [survey])
    assert_declared(table, after, stage(cfg, "sample"))
    # a valid row outside the chosen groups is sampled out; rejects stay rejects
    assert after["sampled_out"].to_pylist() == [True, False, False, True]
    assert mark_sampled_out(table, None, [None])["sampled_out"].to_pylist() == [False] * 4


def test_choose_groups_takes_the_smallest_hashes_of_the_groups_every_teacher_answered():
    pairs = pa.table({"problem_id": ["p1", "p1", "p2", "p3", "p3", "p4", "p4"], "source": ["a", "b", "a", "a", "b", "a", "b"]})
    shared = choose_groups(pairs, SampleConfig(by="problem_id", n=2, seed=7, shared_by="source"))
    eligible = sorted(["p1", "p3", "p4"], key=lambda group: hashlib.sha256(f"7\x00{group}".encode()).hexdigest())
    assert shared.eligible == 3 and shared.chosen == frozenset(eligible[:2])
    assert choose_groups(pairs, SampleConfig(by="problem_id", n=10, seed=7)).chosen == {"p1", "p2", "p3", "p4"}
    # a growing corpus: the sample changes only where a new group hashes below the current n-th
    grown = pa.concat_tables(
        [pairs, pa.table({"problem_id": [f"q{i}" for i in range(20) for _ in "ab"], "source": list("ab") * 20})]
    )
    new = choose_groups(grown, SampleConfig(by="problem_id", n=2, seed=7, shared_by="source")).chosen
    order = sorted(
        ["p1", "p3", "p4", *(f"q{i}" for i in range(20))], key=lambda group: hashlib.sha256(f"7\x00{group}".encode()).hexdigest()
    )
    assert new == frozenset(order[:2])


def test_tokenize_score_and_explode(cfg, student_dirs):
    from pipeline.run.stages.score import ScoreActor

    table = mark_sampled_out(parsed(cfg), None, [None])
    done = frozenset({scored_key("nothing", "scored")})
    source = StudentSource(cfg.students[0].path)
    tokenized = tokenize_batch(table, 0, source, 4096, True, "template", [done])
    assert_declared(table, tokenized, stage(cfg, "tokenize"))
    assert tokenized["ids_0"].to_pylist()[0] and tokenized["ids_0"].to_pylist()[1] is None  # rejects are not encoded
    settings = run_settings(cfg)
    scored = ScoreActor(0, settings)(tokenized)
    assert_declared(tokenized, scored, stage(cfg, "score"))
    stamp = RunStamp("run-1", datetime.now(UTC))
    exploded = explode_batch(
        scored,
        settings.students,
        ["source"],
        ["resp_token_length", "avg_rank_clip", "avg_surprisal", "rank_surprisal_ratio"],
        stamp,
    )
    assert_declared(scored, exploded, stage(cfg, "explode"))
    assert exploded["status"].to_pylist() == [Status.SCORED, Status.REJECTED, Status.REJECTED, Status.SCORED]
    assert (
        exploded["student"].to_pylist() == ["tiny"] * 4
        and exploded["scoring_fingerprint"].to_pylist() == [settings.students[0].fingerprint] * 4
    )


def test_results_of_a_block(cfg):
    block = pa.table({
        "student": ["tiny"] * 3, "status": [Status.SCORED, Status.REJECTED, Status.SKIPPED],
        "content_dropped": [True, None, None], "resp_token_length": [5, None, None],
        "avg_rank_clip": [2.0, None, None], "avg_surprisal": [1.0, None, None], "source": ["t1", "t2", "t1"],
    })  # fmt: skip
    tally = Tally(["source"])
    tally.add(measure_block(block, ["source"]))
    assert tally.counts == {
        "tiny": {"read": 3, "scored": 1, "rejected": 1, "skipped": 1, "sampled_out": 0, "content_dropped": 1, "unread": 0}
    }
    assert tally.tokens == 5 and tally.summary(("student",))["rsr"].to_pylist() == [2.0]


def test_writers_keep_scored_rows_and_new_rejects(cfg):
    rows = {name: [None, None] for name in list(RowContract.of(cfg).scores)}
    rows.update(student=["tiny", "tiny"], source=["a/b=c", "t"], sample_id=["x", "y"], source_file=["f", "f"], row_number=[1, 2])
    block = pa.table(
        {**rows, "status": [Status.SCORED, Status.REJECTED], "reject_reason": [None, "bad"], "reject_detail": [None, "d"]}
    )
    assert scores_batch(block, list(RowContract.of(cfg).scores), ["source"])["sample_id"].to_pylist() == ["x"]
    assert rejects_batch(block, [frozenset()]).column_names == REJECT_COLUMNS
    assert rejects_batch(block, [frozenset({reject_key("tiny", "f", 2, "bad")})]).num_rows == 0  # recorded by an earlier run


def test_a_stage_that_reads_what_no_stage_adds_fails_before_any_work(cfg):
    check_stages(stages(cfg), RAW_SCHEMA.names)
    broken = [*stages(cfg)[:2], Stage("needs a column", repeated_ids, ("no_such_column",), ())]
    with pytest.raises(ConfigError, match="stage 'needs a column' reads \\['no_such_column'\\]"):
        check_stages(broken, RAW_SCHEMA.names)


def test_fingerprints_of_the_typed_settings_equal_those_of_the_settings_dict_before():
    """Outputs scored before the settings were typed must not be rescored: the same hash of the same dict."""
    settings = ScoringSettings("rev", "tmpl", "template", 100, 8192, "truncate", ("rsr",), "float32")
    before = {"student_revision": "rev", "chat_template": "tmpl", "reasoning": "template", "rank_clip": 100,
              "max_model_len": 8192, "on_too_long": "truncate", "metrics": ["rsr"], "dtype": "float32"}  # fmt: skip
    assert settings.fingerprint == hashlib.sha256(json.dumps(before, sort_keys=True).encode()).hexdigest()[:16]


def test_row_columns_get_one_type_across_the_corpus():
    """A block whose values of a column are all null must not write a null-typed column beside the
    other blocks' booleans: every score file of a run has one schema."""
    blocks = [pa.schema([("ok", pa.null()), ("n", pa.int64())]), pa.schema([("ok", pa.bool_()), ("n", pa.int64()), ("x", pa.null())]),
              pa.schema([("mixed", pa.string())]), pa.schema([("mixed", pa.bool_())])]  # fmt: skip
    types = row_column_types(blocks, ("ok", "n", "x", "mixed", "absent"))
    assert types == {"ok": pa.bool_(), "n": pa.int64(), "x": pa.string(), "mixed": pa.string(), "absent": pa.string()}
    rows = raw(
        [
            (json.dumps({"id": "a", "source": True, "messages": GOOD}), None),
            (json.dumps({"id": "b", "source": "t", "messages": GOOD}), None),
        ]
    )
    cfg_corpus = Corpus(
        locate("/c", None), ["/c/a.jsonl"], [], [InputConfig(paths=["x"], passthrough=["source"])], {"/c/a.jsonl": 0}, {}
    )
    parsed_rows = parse_batch(rows, cfg_corpus, ["source"], {"source": pa.string()})
    assert parsed_rows["source"].type == pa.string() and parsed_rows["source"].to_pylist() == ["true", "t"]


def test_the_stage_modules_import_without_torch():
    # Every Ray worker that runs a stage imports its module: the survey's read and group-by workers too.
    check = "import sys, pipeline.run.dataset, pipeline.run.survey; assert not {'torch', 'transformers'} & set(sys.modules), 'torch imported'"
    result = subprocess.run([sys.executable, "-c", check], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
