"""Selection arms over one student's scores, matched in target tokens, and what a selection writes:
training formats, the output file with its sha256, its manifest, a LLaMA-Factory `dataset_info.json`
entry. No torch and no Ray: `jobs.select` runs where neither is installed.

An arm orders each group's rows (the group's "arm order") and takes the first k of them:
  lowest   the most suitable end by the metric's direction first: lowest RSR, highest top1_rate
           (`ascending` set explicitly reads the column in that order instead);
  highest  that order reversed: the least suitable end first;
  middle   the rows around the group's median of that order, nearest first; of two rows equally far
           from the median, the more suitable one first;
  random   a seeded draw: a hash of (seed, sample_id), the same on any machine and in any row order.
Ties go to the smaller sample_id. Across groups, rows are ordered by their place in their group's
arm order, then by the arm's own key: every group's first choice, then every group's second, ...
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.corpus.messages import THINK_CLOSE, THINK_OPEN
from pipeline.corpus.storage import Location
from pipeline.run.lock import AtomicObject, Precondition
from pipeline.scoring.metrics import BY_COLUMN

ARMS = ("lowest", "highest", "middle", "random")
TOKEN_TOLERANCE = 0.001  # arms matched in target tokens: within 0.1% (or one row, where a row is larger)
FORMATS = ("rows", "messages", "sharegpt")
SHAREGPT_FROM = {"system": "system", "developer": "system", "user": "human", "assistant": "gpt"}
SHAREGPT_FROM.update(dict.fromkeys(["tool", "function", "ipython"], "observation"))  # tool results
CHAT_ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class ArmSelection:
    """The rows an arm may choose from, in the arm's order (`arm_rank`: the place in its group's arm
    order, 0 first), and the rows it chose."""

    pool: pd.DataFrame
    chosen: pd.DataFrame
    dropped_groups: int  # groups left out for a truncated trajectory


@dataclass(frozen=True)
class TokenMatch:
    """What matching an arm to another arm's target tokens did."""

    action: str  # "trim", "fill" or "none" (within tolerance, or the next row would move it further)
    rows_moved: int
    tokens_before: int
    tokens_after: int
    target_tokens: int
    tolerance_tokens: float  # 0.1% of the target; the last row moved may leave up to half a row more

    def describe(self) -> str:
        change = {"none": "kept as chosen", "trim": f"dropped {self.rows_moved} rows", "fill": f"added {self.rows_moved} rows"}
        return (
            f"matched tokens: {change[self.action]}: {self.tokens_before:,} -> {self.tokens_after:,} target tokens "
            f"(other arm {self.target_tokens:,}, difference {self.tokens_after - self.target_tokens:+,}, "
            f"0.1% is {self.tolerance_tokens:,.1f})"
        )


def _groups(frame: pd.DataFrame, group_by: list[str] | None):
    # Without --group-by the whole selection is one group.
    keys = group_by if group_by else pd.Series(0, index=frame.index)
    return frame.groupby(keys, sort=False, dropna=False)


def _seeded_draw(sample_ids: pd.Series, seed: int) -> pd.Series:
    """A number in [0, 1) per sample_id that depends only on the seed and the id."""

    def draw(sample_id) -> float:
        return int.from_bytes(hashlib.sha256(f"{seed}:{sample_id}".encode()).digest()[:8], "big") / 2**64

    return sample_ids.map(draw).astype(float)


def suitable_first(by: str, ascending: bool | None) -> bool:
    """Whether `by` is read ascending: as asked, else the metric's most suitable end first."""
    if ascending is not None:
        return ascending
    return BY_COLUMN[by].lower_is_better if by in BY_COLUMN else True


def arm_order(rows: pd.DataFrame, group_by: list[str] | None, by: str, ascending: bool, arm: str, seed: int) -> pd.DataFrame:
    """`rows` in the arm's order across groups, with `arm_rank` (place in the group's arm order)."""
    preferred = rows.sort_values([by, "sample_id"], ascending=[ascending, True], kind="stable", na_position="last")
    position = _groups(preferred, group_by).cumcount()
    value = preferred[by] if ascending else -preferred[by]
    if arm == "lowest":
        key = value
    elif arm == "highest":
        key = -value
    elif arm == "middle":  # distance from the group's median position, 0 to 1
        last = _groups(preferred, group_by)["sample_id"].transform("size") - 1
        key = (2 * position - last).abs() / last.clip(lower=1)
    elif arm == "random":
        key = _seeded_draw(preferred["sample_id"], seed)
    else:
        raise ValueError(f"unknown arm {arm!r}; one of {', '.join(ARMS)}")
    ordered = preferred.assign(_key=key, _position=position)
    ordered = ordered.sort_values(["_key", "_position", "sample_id"], kind="stable", na_position="last")
    ordered["arm_rank"] = _groups(ordered, group_by).cumcount()
    ordered = ordered.sort_values(["arm_rank", "_key", "_position", "sample_id"], kind="stable", na_position="last")
    return ordered.drop(columns=["_key", "_position"]).reset_index(drop=True)


def select_arm(
    scores: pd.DataFrame,
    student: str,
    group_by: list[str] | None = None,
    top_k: int | None = None,
    top_fraction: float | None = None,
    threshold: float | None = None,
    ascending: bool | None = None,
    by: str = "rank_surprisal_ratio",
    where: dict[str, str] | None = None,
    arm: str = "lowest",
    seed: int = 0,
    drop_truncated_groups: bool = False,
) -> ArmSelection:
    """One student's rows whose columns equal `where`'s values (compared as text, case-insensitively:
    {"is_correct": "true"}), without the groups in which any of the student's trajectories was truncated
    (when asked; checked before `where`), chosen by `arm` (see the module docstring).

    Exactly one of `top_k` (per group when `group_by` is given), `top_fraction` (of each group, at least
    one row) or `threshold` (`by` at most this, at least when read descending; the lowest arm only) is set.
    """
    if sum(x is not None for x in (top_k, top_fraction, threshold)) != 1:
        raise ValueError("set exactly one of top_k, top_fraction, threshold")
    if arm not in ARMS:
        raise ValueError(f"unknown arm {arm!r}; one of {', '.join(ARMS)}")
    if threshold is not None and arm != "lowest":
        raise ValueError(f"the {arm} arm takes top_k or top_fraction; a threshold reads the lowest arm's order")
    if drop_truncated_groups and not group_by:
        raise ValueError("dropping truncated groups needs group_by (the columns that make a group)")
    needed = [by, *(where or {}), *(group_by or []), *(["truncated"] if drop_truncated_groups else [])]
    for column in needed:
        if column not in scores.columns:
            raise ValueError(f"no column {column!r} in the scores; have {sorted(scores.columns)}")
    mine = scores[scores["student"] == student]
    if mine.empty:
        raise ValueError(f"no scores for student {student!r}; have {sorted(scores['student'].unique())}")
    dropped_groups = 0
    if drop_truncated_groups:
        truncated_group = _groups(mine, group_by)["truncated"].transform(lambda t: t.fillna(False).astype(bool).any())
        dropped_groups = _groups(mine[truncated_group], group_by).ngroups
        mine = mine[~truncated_group]
    for column, value in (where or {}).items():
        mine = mine[mine[column].astype(str).str.lower() == str(value).lower()]
    ascending = suitable_first(by, ascending)
    pool = arm_order(mine, group_by, by, ascending, arm, seed)
    if threshold is not None:
        keep = pool[by] <= threshold if ascending else pool[by] >= threshold
    else:
        size = _groups(pool, group_by)["sample_id"].transform("size")
        per_group = top_k if top_k is not None else (size * top_fraction).round().clip(lower=1)
        keep = pool["arm_rank"] < per_group
    return ArmSelection(pool, pool[keep], dropped_groups)


def match_tokens(selection: ArmSelection, target_tokens: int) -> tuple[ArmSelection, TokenMatch]:
    """The selection trimmed or filled until its target tokens (sum of `resp_token_length`) are within
    0.1% of `target_tokens`, or within one row. Trimming drops chosen rows from the end of the arm's
    order (each group's last choice first); filling adds unchosen rows in the arm's order (each group's
    next choice). The row that crosses into the tolerance stays only if that leaves the total closer.
    Raises ValueError when even every unchosen row does not fill the gap."""
    pool = selection.pool
    chosen = pool.index.isin(selection.chosen.index)
    before = total = int(pool.loc[chosen, "resp_token_length"].sum())
    tolerance = TOKEN_TOLERANCE * target_tokens
    if abs(total - target_tokens) <= tolerance:
        return selection, TokenMatch("none", 0, total, total, target_tokens, tolerance)
    trim = total > target_tokens
    steps = pool[chosen].iloc[::-1] if trim else pool[~chosen]
    moved = []
    for index, length in steps["resp_token_length"].items():
        previous, total = total, total - int(length) if trim else total + int(length)
        moved.append(index)
        if (total <= target_tokens + tolerance) if trim else (total >= target_tokens - tolerance):
            if abs(previous - target_tokens) < abs(total - target_tokens):
                moved.pop()
                total = previous
            break
    else:  # only a fill runs out: a trim reaches 0 tokens at worst
        raise ValueError(
            f"cannot match {target_tokens:,} target tokens: this arm has {before:,}, and adding every one of its "
            f"{len(steps)} unchosen rows gives {total:,} (short by {target_tokens - total:,}); "
            "make the other arm smaller, or this arm's pool larger (fewer --where conditions, no --drop-truncated-groups)"
        )
    chosen[pool.index.get_indexer(moved)] = not trim
    action = ("trim" if trim else "fill") if moved else "none"  # none: the next row would move it further
    match = TokenMatch(action, len(moved), before, total, target_tokens, tolerance)
    return ArmSelection(pool, pool[chosen], selection.dropped_groups), match


def _inline_reasoning(message: dict) -> str | None:
    """The content with the message's reasoning before it as `<think>\\n...\\n</think>\\n\\n`, the block
    `scoring.reasoning: keep` scores for templates that ignore `reasoning_content`."""
    reasoning, content = message.get("reasoning_content"), message.get("content")
    if not reasoning:
        return content
    return f"{THINK_OPEN}\n{reasoning.strip(chr(10))}\n{THINK_CLOSE}\n\n" + (content or "").lstrip("\n")


def to_messages(sample_id: str, messages: list[dict]) -> dict:
    """A training row in the OpenAI chat shape: `{"id", "messages": [{role, content, tool keys}]}`."""
    converted = []
    for message in messages:
        entry = {key: value for key, value in message.items() if key != "reasoning_content"}
        converted.append({**entry, "content": _inline_reasoning(message)})
    return {"id": sample_id, "messages": converted}


def _function_call(sample_id: str, message: dict) -> str:
    """A tool-calling turn as LLaMA-Factory's `function_call` value: the reasoning's think block, then
    the call as JSON `{"name", "arguments"}` (a list of them for parallel calls)."""
    if message.get("content"):
        raise ValueError(
            f"{sample_id}: an assistant message holds text and a tool call; ShareGPT's function_call turn "
            "cannot carry both (use --format messages)"
        )
    calls = []
    for call in message["tool_calls"]:
        function = call.get("function") or call
        arguments = function.get("arguments")
        if isinstance(arguments, str):  # OpenAI gives the arguments as JSON text
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                pass
        calls.append({"name": function["name"], "arguments": arguments})
    text = json.dumps(calls[0] if len(calls) == 1 else calls, ensure_ascii=False)
    return _inline_reasoning({"reasoning_content": message.get("reasoning_content"), "content": text})


def to_sharegpt(sample_id: str, messages: list[dict]) -> dict:
    """A training row in ShareGPT's shape: `{"id", "conversations": [{from, value}]}`, `from` one of
    system, human, gpt, function_call (a tool-calling turn), observation (a tool result)."""
    turns = []
    for message in messages:
        if message.get("tool_calls"):
            turns.append({"from": "function_call", "value": _function_call(sample_id, message)})
        else:
            turns.append({"from": SHAREGPT_FROM[message["role"]], "value": _inline_reasoning(message)})
    return {"id": sample_id, "conversations": turns}


def dataset_info_entry(file_name: str, fmt: str, rows: list[dict]) -> dict:
    """LLaMA-Factory's description of an output file of `rows` in `dataset_info.json` (its data/README.md).
    Its OpenAI-style reading knows the chat roles only: it would skip a row with any other turn unread."""
    if fmt == "sharegpt":
        return {"file_name": file_name, "formatting": "sharegpt", "columns": {"messages": "conversations"}}
    if fmt == "messages":
        for row in rows:
            if any(m["role"] not in CHAT_ROLES or m.get("tool_calls") for m in row["messages"]):
                raise ValueError(
                    f"{row['id']} has tool turns or roles beyond {CHAT_ROLES}: LLaMA-Factory reads them in --format sharegpt only"
                )
        tags = {
            "role_tag": "role",
            "content_tag": "content",
            "user_tag": "user",
            "assistant_tag": "assistant",
            "system_tag": "system",
        }
        return {"file_name": file_name, "formatting": "sharegpt", "columns": {"messages": "messages"}, "tags": tags}
    raise ValueError(f"a dataset_info.json entry needs --format sharegpt or messages, not {fmt!r}")


def encode_rows(rows: list[dict], parquet: bool) -> bytes:
    """The output file's bytes: Parquet, or one JSON object a line."""
    if parquet:
        buffer = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(rows), buffer)
        return buffer.getvalue()
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode()


def write_whole(location: Location, data: bytes) -> str:
    """Write a file whole (a rename locally, one PUT on S3): a reader never sees half of it. Returns
    its sha256."""
    location.fs.makedirs(location.path.rsplit("/", 1)[0], exist_ok=True)
    AtomicObject(location).replace(data)
    return hashlib.sha256(data).hexdigest()


def update_dataset_info(location: Location, name: str, entry: dict, attempts: int = 20) -> None:
    """Set `name`'s entry in the `dataset_info.json` at `location`, keeping the other entries. The update
    only replaces the version it read (several arms may be exported into one folder at once)."""
    store = AtomicObject(location)
    for _ in range(attempts):
        data, version = store.read()
        info = json.loads(data) if data else {}
        info[name] = entry
        encoded = json.dumps(info, indent=2, ensure_ascii=False).encode()
        try:
            store.create(encoded) if version is None else store.replace(encoded, version)
            return
        except Precondition:
            continue
    raise RuntimeError(f"{location.url()} kept changing while it was updated; try again")


def describe_selection(chosen: pd.DataFrame, group_by: list[str] | None, teacher_column: str | None) -> dict:
    """The manifest's account of the chosen rows: counts, target tokens (sum of `resp_token_length`),
    per teacher, and the runs and scoring settings that scored them."""
    tokens = chosen["resp_token_length"].astype("int64")
    teachers = None
    if teacher_column:
        names = chosen[teacher_column].astype(object).where(chosen[teacher_column].notna(), "(missing)").astype(str)
        per_teacher = tokens.groupby(names).agg(["size", "sum"])
        teachers = {name: {"rows": int(n), "tokens": int(total)} for name, (n, total) in per_teacher.iterrows()}
    fingerprints = chosen["scoring_fingerprint"].dropna() if "scoring_fingerprint" in chosen.columns else pd.Series([])
    return {
        "rows": len(chosen),
        "groups": _groups(chosen, group_by).ngroups if group_by else None,
        "target_tokens": int(tokens.sum()),
        "teacher_column": teacher_column,
        "teachers": teachers,
        "run_ids": sorted(chosen["run_id"].dropna().unique().tolist()),
        "scoring_fingerprints": sorted(fingerprints.unique().tolist()),
    }
