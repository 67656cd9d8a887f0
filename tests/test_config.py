import json
import os
import subprocess
import sys

import pytest

from jobs.score import main
from pipeline.corpus.storage import expand_inputs
from pipeline.run.config import ConfigError, actor_bounds, load_config
from tests.conftest import REPO

DEMO = "jobs/configs/demo.yaml"


def test_demo_config_loads_with_overrides():
    cfg = load_config(DEMO, ["scoring.rank_clip=50", "students.0.dtype=bfloat16", "input.paths=[a.jsonl,b/]"])
    assert cfg.scoring.rank_clip == 50 and cfg.students[0].dtype == "bfloat16"
    assert cfg.input.paths == ["a.jsonl", "b/"] and cfg.output.partition_by == ["source"]


def test_overrides_in_braces_or_brackets_replace_a_section_list_or_mapping_whole():
    """Typed items and sections are built on their type's defaults: nothing of the configured value stays."""
    cfg = load_config(DEMO, ["students=[{name: a, path: p}, {name: b, path: q, dtype: bfloat16}]",
                             "input.sources=[{paths: [t.jsonl], prompt_field: q, response_groups: {x: {response: r}}}]",
                             "input.response_groups={y: {response: s}}", "input.prompt_field=q"])  # fmt: skip
    assert [(s.name, s.path, s.dtype, s.tokenizer) for s in cfg.students] == [
        ("a", "p", "auto", None),
        ("b", "q", "bfloat16", None),
    ]
    assert cfg.input.sources[0].response_groups["x"].response == "r" and cfg.input.sources[0].candidates_field is None
    assert list(cfg.input.response_groups) == ["y"]
    cfg = load_config(DEMO, ["students=[{name: a, path: p}, {name: b, path: q}]", "students=[{name: c, path: r}]",
                             "students.0={name: d, path: s}", "input.response_groups={y: {response: s}}",
                             "input.response_groups={z: {response: s}}", "input.response_groups.w={response: u}",
                             "input.prompt_field=q", "scoring.rank_clip=7", "scoring={max_model_len: 512}",
                             "input.passthrough=[problem_id, source]", "input.sample={by: problem_id, n: 3}"])  # fmt: skip
    assert [(s.name, s.path) for s in cfg.students] == [("d", "s")]
    assert {k: g.response for k, g in cfg.input.response_groups.items()} == {"z": "s", "w": "u"}
    assert (cfg.scoring.max_model_len, cfg.scoring.rank_clip) == (512, 100)
    assert (cfg.input.sample.by, cfg.input.sample.n, cfg.input.sample.seed) == ("problem_id", 3, 0)
    with pytest.raises(ConfigError, match=r"missing mandatory value: n"):
        load_config(DEMO, ["input.passthrough=[problem_id, source]", "input.sample={by: problem_id}"])
    with pytest.raises(ConfigError, match=r"list is not a subclass of StudentConfig.*\(key: students\[0\]\)"):
        load_config(DEMO, ["students.0=[{name: a, path: p}]"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("scoring.rank_klip=5", "rank_klip"),
        ("students.0.dtype=int8", "students.0.dtype must be one of"),
        ("scoring.rank_clip=0", "scoring.rank_clip must be >= 1"),
        ("scoring.rank_clip=many", "rank_clip"),
        ("input.paths=[]", "input.paths is empty"),
        ("output.partition_by=[teacher]", "must also be in input.passthrough"),
        ("students.0.name=../escape", "students.0.name"),
        ("output.mode=append", "output.mode must be one of"),
        ("rank_clip", "is not key=value"),
        ("scoring.reasoning=drop", "scoring.reasoning must be one of"),
        ("students.0.chat_template=missing.jinja", "students.0.chat_template 'missing.jinja' is neither a file"),
        ("input.prompt_field=question", "input.prompt_field and input.response_field go together"),
        ("input.candidate_passthrough=[correct]", "input.candidate_passthrough needs input.candidates_field"),
        ("scoring.rows_per_batch=64", "is no longer used: a scoring call is sized by tokens, scoring.batch_tokens"),
        ("compute.actors_per_student=some", "compute.actors_per_student must be a number, a range min..max or auto"),
        ("compute.actors_per_student=0", "compute.actors_per_student '0': at least 1 actor, and min <= max"),
        ("compute.actors_per_student=4..2", "compute.actors_per_student '4..2': at least 1 actor, and min <= max"),
    ],
)
def test_bad_config_is_a_clear_error(override, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("[", r"\[")):
        load_config(DEMO, [override])


@pytest.mark.parametrize(("setting", "bounds"), [("2", (2, 2)), ("1..4", (1, 4)), ("auto", (1, None))])
def test_actors_per_student_is_a_number_a_range_or_auto(setting, bounds):
    """A number, as YAML writes it, still loads (the key's old type): a fixed pool."""
    cfg = load_config(DEMO, [f"compute.actors_per_student={setting}"])
    assert actor_bounds(cfg.compute.actors_per_student) == bounds


@pytest.mark.parametrize(
    ("overrides", "message"),
    [  # from the corpus-shape registry: one source of responses per corpus part
        (["input.prompt_field=q", "input.response_field=r", "input.candidates_field=g"],
         "input.response_field and input.candidates_field are exclusive"),
        (["input.candidates_field=g", "input.response_groups={a: {response: r}}"],
         "input.candidates_field and input.response_groups are exclusive"),
        (["input.response_groups={a: {response: r}}", "input.reasoning_field=t"], "input.reasoning_field needs input.response_field"),
    ],
)  # fmt: skip
def test_corpus_shapes_that_cannot_go_together(overrides, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        load_config(DEMO, overrides)


def test_missing_config_file_and_input_paths(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    cfg = load_config(DEMO, [f"input.paths=[{tmp_path}/missing.jsonl]"])
    with pytest.raises(ConfigError, match="input path not found"):
        expand_inputs(cfg.input.paths, cfg.storage, cfg.input.format)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ConfigError, match="cannot tell the format"):
        expand_inputs([str(tmp_path / "notes.txt")], cfg.storage, "auto")


def test_directories_and_globs_expand_and_report_skipped_files(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    for name in ["d/a.jsonl", "d/sub/b.parquet", "d/README.md", "d/_SUCCESS", "c.json"]:
        (tmp_path / name).write_text("")
    cfg = load_config(DEMO)
    _, files, skipped = expand_inputs([str(tmp_path / "d"), str(tmp_path / "*.json")], cfg.storage, "auto")
    assert [f.removeprefix(str(tmp_path)) for f in files] == ["/c.json", "/d/a.jsonl", "/d/sub/b.parquet"]
    assert [f.removeprefix(str(tmp_path)) for f in skipped] == ["/d/README.md"]


def test_cli_exits_2_with_the_message(capsys):
    assert main(["--config", DEMO, "scoring.rank_clip=-1"]) == 2
    assert "scoring.rank_clip must be >= 1" in capsys.readouterr().err


def test_a_bad_config_fails_before_torch_or_ray_is_imported():
    """The config check is the job's first step and needs neither."""
    check = (
        f"import sys; from jobs.score import main; code = main(['--config', {DEMO!r}, 'scoring.rank_clip=-1']); "
        "print(code, sorted({'torch', 'transformers', 'ray'} & set(sys.modules)))"
    )
    result = subprocess.run([sys.executable, "-c", check], cwd=REPO, capture_output=True, text=True)
    assert result.stdout.split() == ["2", "[]"], result.stderr


# A corpus shape the project does not have (preference pairs: a prompt, a chosen and a rejected
# response), written into pipeline/corpus/shapes.py as a shape would be added: its code and one SHAPES entry.
PAIRS_CODE = """
@dataclass
class PairKeys:
    chosen_field: Optional[str] = None
    rejected_field: Optional[str] = None


def _pair_trajectories(row, cfg):
    prompt = prompt_messages(row, cfg)
    return [Trajectory(f"#{side}", {"preference": side},
                       validate_messages(canonical_messages([*prompt, {"role": "assistant", "content": row[name]}])))
            for side, name in (("chosen", cfg.chosen_field), ("rejected", cfg.rejected_field))]


def _check_pairs(i, key, require):
    require(i.rejected_field, f"{key}chosen_field needs {key}rejected_field too")


"""
PAIRS_ENTRY = 'CorpusShape("pairs", PairKeys, {"preference": "string"}, _pair_trajectories, _check_pairs),'

PAIRS_RUN = """
import importlib.util, json, sys, types
from pathlib import Path

import pandas as pd

# The shape's code before the registry, its entry last (after the default shape).
source = Path(importlib.util.find_spec("pipeline.corpus.shapes").origin).read_text()
lines = source.splitlines(keepends=True)
registry = lines.index("SHAPES = _registry(\\n")
last = registry + next(i for i, line in enumerate(lines[registry:]) if line.startswith(")"))
lines[last:last] = ["    " + PAIRS_ENTRY + "\\n"]
lines[registry:registry] = [PAIRS_CODE]
shapes = sys.modules["pipeline.corpus.shapes"] = types.ModuleType("pipeline.corpus.shapes")
exec(compile("".join(lines), "pipeline/corpus/shapes.py", "exec"), shapes.__dict__)

from pipeline.run.config import ConfigError, input_sources, load_config
from pipeline.decide.query import original_rows
from pipeline.corpus.records import parse_row
from pipeline.run.schema import RowContract

base = ["input.paths=[x.jsonl]", "students=[{name: s, path: p}]", "input.prompt_field=question"]
errors = []
for extra in (["input.rejected_field=worse"], ["input.chosen_field=better"],
              ["input.chosen_field=better", "input.rejected_field=worse", "input.response_groups={t: {response: a}}"]):
    try:
        load_config(None, base + extra)
    except ConfigError as exc:
        errors.append(str(exc).splitlines()[1:])
plain = load_config(None, base[:2])  # no shape key set: the default shape, wherever the new entry stands
cfg = load_config(None, base + ["input.chosen_field=better", "input.rejected_field=worse", "output.partition_by=[preference]"])
row = {"id": "q1", "question": "2+2?", "better": "4", "worse": "5"}
Path("x.jsonl").write_text(json.dumps(row) + "\\n")
parsed = parse_row(json.dumps(row), "x.jsonl", 1, cfg.input)
(source,) = input_sources(load_config(None, [*base[1:], "input.sources=[{paths: [y.jsonl], chosen_field: a, rejected_field: b}]"]).input)
rejected = pd.DataFrame({"source_file": ["x.jsonl"], "row_number": [1], "content_hash": [parsed[1]["content_hash"]]})
print(json.dumps({"errors": errors, "plain_shape": shapes.shape_of(plain.input).name, "source_shape": shapes.shape_of(source).name,
                  "row_columns": list(RowContract.of(cfg).row),
                  "parsed": [(p["sample_id"], p["preference"], p["messages"][-1]["content"]) for p in parsed],
                  "selected": original_rows(rejected, cfg.input)[0]["messages"][-1]["content"]}))
"""


def test_a_new_corpus_shape_is_one_registry_entry(tmp_path):
    """Written last in SHAPES, after the default shape (which a part without shape keys keeps): its keys
    join the config schema (and `input.sources` items), the generic checks (a second key needs the first;
    two sources of responses are exclusive) and its own apply, its column joins the row contract (so
    output.partition_by accepts it), rows parse through it, and jobs.select's original rows come back
    through it."""
    script = f"PAIRS_CODE = {PAIRS_CODE!r}\nPAIRS_ENTRY = {PAIRS_ENTRY!r}\n" + PAIRS_RUN
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})  # fmt: skip
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["errors"] == [
        ["  - input.rejected_field needs input.chosen_field", "  - input.prompt_field and input.response_field go together"],
        ["  - input.chosen_field needs input.rejected_field too"],
        [
            "  - input.response_groups and input.chosen_field are exclusive: one source of responses",
            "  - input.rejected_field needs input.chosen_field",
        ],
    ]
    assert out["row_columns"] == ["preference"] and out["source_shape"] == "pairs" and out["plain_shape"] == "row"
    assert out["parsed"] == [["q1#chosen", "chosen", "4"], ["q1#rejected", "rejected", "5"]]
    assert out["selected"] == "5"  # jobs.select's original rows: the selected trajectory's messages
