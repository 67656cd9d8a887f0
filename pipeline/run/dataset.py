"""The scoring dataset: read the corpus files, parse rows, tokenize and score them per student in actor
pools, and explode the results to long format (one row per trajectory and student) for the commit.

Each stage lives in its own module under `pipeline/run/stages/`, its declaration (the columns it reads and
adds, in the names of `pipeline.run.schema`) beside its function; `build_dataset` checks the chain before
any work and maps the stages in order: read, parse, dedupe, sample, then per student tokenize and score,
then explode."""

from __future__ import annotations

import ray

from pipeline.run.schema import RAW_SCHEMA
from pipeline.run.stages.base import DatasetPlan, Stage, check_stages
from pipeline.run.stages.dedupe import dedupe_stage
from pipeline.run.stages.explode import explode_stage
from pipeline.run.stages.parse import parse_stage
from pipeline.run.stages.read import CorpusDatasource
from pipeline.run.stages.sample import sample_stage
from pipeline.run.stages.score import score_stage
from pipeline.run.stages.tokenize import tokenize_stage

# Bytes a tokenized row holds per token: its messages as text, the int32 ids of every token and the
# int32 positions of the response tokens, and its other columns (measured: 9.1 on the GSM8K rows, 10.1
# on the AMC23 answers, before the per-row columns). Parse, dedupe, tokenize and score run fused in the
# scoring actor, and Ray Data cuts each stage's output to the dataset's block size: the tokenized block
# is what one scoring call receives, so this turns `scoring.batch_tokens` into that size. (At the 4
# bytes of text per token it once assumed, a call got a third of its tokens: 0.86 padding efficiency
# and a 600-row job 16% slower.) A truncated row holds more text than tokens: its block is smaller.
TOKENIZED_BYTES_PER_TOKEN = 10


def scoring_stages(plan: DatasetPlan) -> list[Stage]:
    """The stages after `read`, in order; each module declares its own."""
    per_student_stages = [stage(plan, i) for i in range(len(plan.settings.students)) for stage in (tokenize_stage, score_stage)]
    return [parse_stage(plan.cfg, plan.contract, plan.corpus, plan.survey), dedupe_stage(plan), sample_stage(plan),
            *per_student_stages, explode_stage(plan)]  # fmt: skip


def build_dataset(plan: DatasetPlan):
    """The lazy Ray dataset of long-format results for the corpus: the stages' columns are checked
    first, then each stage maps the blocks of the one before."""
    stages = scoring_stages(plan)
    check_stages(stages, RAW_SCHEMA.names)
    # One read task per file: Ray Data would otherwise cut each file's blocks into pieces to reach its
    # minimum read parallelism (the 600-row GSM8K file: 100-row scoring calls, whatever batch_tokens says).
    ds = ray.data.read_datasource(CorpusDatasource(plan.corpus), override_num_blocks=len(plan.corpus.files))
    # A scoring call takes one tokenized block: blocks hold about `batch_tokens` tokens, so that results,
    # checkpoints and progress keep coming whatever the row lengths (this dataset's context only).
    ds.context.target_max_block_size = plan.settings.batch_tokens * TOKENIZED_BYTES_PER_TOKEN
    for stage in stages:
        ds = stage.apply(ds)
    return ds
