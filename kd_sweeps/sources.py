"""The paper's reasoning datasets, in their published schemas, turned into training records.

Every source yields records ``{"problem", "reasoning", "answer"}``: ``problem`` is the user turn,
``reasoning`` the assistant turn (``<think>…</think>`` then the answer), ``answer`` the final boxed
answer or "". The dataset's system prompt is dropped (the student's chat template supplies its own).

Schemas (the columns each dataset publishes):
- ``conversations``: Bespoke-Stratos-17k, OpenThoughts-114k, Sky-T1_data_17k. ``system`` plus
  ``conversations = [{"from": "user", "value": …}, {"from": "assistant", "value": …}]``; the
  assistant text is ``<|begin_of_thought|>…<|end_of_thought|>\\n\\n<|begin_of_solution|>\\n\\n…
  \\n\\n<|end_of_solution|>``.
- ``synthetic1``: PrimeIntellect/SYNTHETIC-1: ``prompt``, ``llm_response``, ``task_type`` and
  metadata. The responses were generated with ``<think>`` prefilled in the prompt, so most start
  inside the thought and contain only ``</think>``: the opening marker is restored (and counted).
- ``nemotron``: nvidia/Llama-Nemotron-Post-Training-Dataset (SFT, math): ``input`` (chat messages;
  a Llama-3-templated string in the v1 release), ``output`` (``<think>…</think>`` then the answer
  when ``reasoning == "on"``), ``system_prompt`` ("detailed thinking on/off").
- ``records``: a file already in the record schema.

A record is usable when its reasoning holds exactly one ``<think>`` before exactly one ``</think>``
with a non-empty thought and a non-empty answer after it, and the problem holds neither marker. Others are dropped from both
splits and counted by reason in the report: the section masks cannot be placed on them.
Which rows are kept (the length filter or the authors' published rows), the split and the cache of the
formatted and tokenized tables are ``kd_sweeps.prepare``'s.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from kd_sweeps.answers import last_boxed

THINK, END_THINK = "<think>", "</think>"
SCHEMAS = ("conversations", "synthetic1", "nemotron", "records")


class SourceError(ValueError):
    """A dataset or record that cannot be read, named with its index and what is wrong."""


@dataclass(frozen=True)
class DatasetSpec:
    hub_id: str
    config: str | None
    split: str
    schema: str
    n_train: int | None = None  # None: every usable record not held out for validation
    n_val: int | None = None  # None: no published size, the caller must give one
    row_filter: tuple[str, str] | None = None  # (column, value) a row must have to be used


# Sizes: the paper's (rows under 4k tokens, split with seed 42) and the authors' training script
# (1,000 validation rows for all three).
# SYNTHETIC-1 and Nemotron were loaded by the authors' code but no sizes were published for them.
DATASETS: dict[str, DatasetSpec] = {
    "bespoke_stratos17k": DatasetSpec("bespokelabs/Bespoke-Stratos-17k", None, "train",
                                      "conversations", 8_000, 1_000),
    "open_thoughts114k": DatasetSpec("open-thoughts/OpenThoughts-114k", "default", "train",
                                     "conversations", 40_000, 1_000),
    "skyt1": DatasetSpec("NovaSky-AI/Sky-T1_data_17k", None, "train", "conversations", 8_000, 1_000),
    "synthetic1": DatasetSpec("PrimeIntellect/SYNTHETIC-1", None, "train", "synthetic1",
                              row_filter=("task_type", "verifiable_math")),
    "nemotron": DatasetSpec("nvidia/Llama-Nemotron-Post-Training-Dataset", "SFT", "math", "nemotron"),
}

USER_ROLES, ASSISTANT_ROLES = ("user", "human"), ("assistant", "gpt")  # ShareGPT spellings too


@dataclass
class SourceReport:
    """What happened to the rows of one dataset on their way to records (``as_dict``: the run's
    ``data_rows``)."""

    source: str
    schema: str
    choice: str = "length"  # data.rows: length (filter, then split) | paper (published rows, split, then drops)
    rows: int = 0  # rows read
    filtered_out: int = 0  # rows without the dataset's row filter (SYNTHETIC-1: other task types)
    selected: int | None = None  # data.rows=paper: rows of the authors' list
    dropped: Counter = field(default_factory=Counter)  # reason -> records dropped (no usable markers)
    think_restored: int = 0  # SYNTHETIC-1 responses given back the <think> that was prefilled
    too_long: int | None = None  # rows over max_tokens tokens (None: not tokenized, not checked)
    max_tokens: int | None = None
    kept: int = 0  # length: usable rows the split is drawn from; paper: usable rows of the split
    duplicates: int = 0  # usable rows equal (problem and reasoning) to an earlier usable row: kept, counted
    val_overlap: int = 0  # validation rows equal to a training row: taken out of the validation split
    n_train: int = 0
    n_val: int = 0
    prepared_here: bool = False  # this process formatted/tokenized (False: read from the cache)
    first_dropped: list[str] = field(default_factory=list)  # a few messages to show the user

    @property
    def missing_markers(self) -> int:
        """Records dropped because they lack a usable <think>…</think> pair or a single-turn
        prompt: never trained or validated on."""
        return sum(self.dropped.values())

    def as_dict(self) -> dict:
        return {"rows": self.choice, "read": self.rows, "filtered_out": self.filtered_out, "selected": self.selected,
                "dropped_markers": self.missing_markers, "dropped_by_reason": dict(self.dropped),
                "think_restored": self.think_restored, "too_long": self.too_long, "max_tokens": self.max_tokens,
                "kept": self.kept, "duplicates": self.duplicates, "val_overlap_removed": self.val_overlap,
                "train": self.n_train, "val": self.n_val}

    def summary(self) -> str:
        reasons = ", ".join(f"{n} {why}" for why, n in self.dropped.most_common()) or "none"
        first = f"; first dropped: {'; '.join(self.first_dropped)}" if self.first_dropped else ""
        selected = f", {self.selected} in the authors' list" if self.selected is not None else ""
        long = "" if self.too_long is None else f", {self.too_long} longer than max_tokens={self.max_tokens}"
        return (f"{self.source} [{self.schema}, rows={self.choice}]: {self.rows} rows, {self.filtered_out} filtered "
                f"out{selected}, {self.missing_markers} dropped ({reasons}){long}, {self.think_restored} with "
                f"<think> restored, {self.kept} kept ({self.duplicates} duplicated) -> {self.n_train} train / "
                f"{self.n_val} val ({self.val_overlap} removed from val: also in train){first}")


def _problem_hint(text) -> str:
    return repr(text[:60] + ("…" if len(text) > 60 else "")) if isinstance(text, str) else "unknown"


def _fail(index, problem, what: str):
    where = f"record {index}" if index is not None else "record"
    raise SourceError(f"{where} (problem: {_problem_hint(problem)}): {what}")


def _need_str(value, name: str, index, problem) -> str:
    if not isinstance(value, str):
        _fail(index, problem, f"field {name} is {type(value).__name__}, expected a string")
    return value


def _need_keys(raw: dict, keys, schema: str, index):
    missing = [k for k in keys if k not in raw]
    if missing:
        _fail(index, None, f"no field(s) {missing} for schema {schema!r} (has {sorted(raw)})")


def _convert_thought_markers(text: str) -> str:
    """The paper's replacements (thought markers -> <think>/</think>, solution wrappers with their
    blank line removed), then the solution markers with other whitespace: the exact strings are
    only the common spelling, and a leftover marker would otherwise sit in the answer."""
    text = text.replace("<|begin_of_solution|>\n\n", "").replace("\n\n<|end_of_solution|>", "")
    text = text.replace("<|begin_of_thought|>", THINK).replace("<|end_of_thought|>", END_THINK)
    text = re.sub(r"<\|begin_of_solution\|>[ \t]*\n?", "", text)
    return re.sub(r"\n?[ \t]*<\|end_of_solution\|>", "", text)


def _from_conversations(raw: dict, index) -> tuple[str, str, str | None]:
    _need_keys(raw, ("conversations",), "conversations", index)
    turns = raw["conversations"]
    if isinstance(turns, str):  # some copies store the list as a JSON string
        turns = json.loads(turns)
    if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
        _fail(index, None, f"conversations is {type(turns).__name__}, expected a list of turns")
    user = [t for t in turns if t.get("from") in USER_ROLES]
    assistant = [t for t in turns if t.get("from") in ASSISTANT_ROLES]
    problem = user[0].get("value") if user else None
    unknown = sorted({str(t.get("from")) for t in turns} - set(USER_ROLES + ASSISTANT_ROLES + ("system",)))
    if unknown:
        _fail(index, problem, f"conversation role(s) {unknown}; expected user/assistant")
    if len(user) != 1 or len(assistant) != 1:
        return problem, "", f"{len(user)} user and {len(assistant)} assistant turns (want 1 and 1)"
    problem = _need_str(problem, "conversations[user].value", index, problem)
    reasoning = _need_str(assistant[0].get("value"), "conversations[assistant].value", index, problem)
    return problem, _convert_thought_markers(reasoning), None


def _from_synthetic1(raw: dict, index) -> tuple[str, str, str | None]:
    _need_keys(raw, ("prompt", "llm_response"), "synthetic1", index)
    problem = _need_str(raw["prompt"], "prompt", index, raw["prompt"])
    response = _need_str(raw["llm_response"], "llm_response", index, problem)
    return problem, response, None


_LLAMA_USER = re.compile(r"<\|start_header_id\|>user<\|end_header_id\|>\n\n(.*?)<\|eot_id\|>", re.S)


def _from_nemotron(raw: dict, index) -> tuple[str, str, str | None]:
    _need_keys(raw, ("input", "output"), "nemotron", index)
    prompt = raw["input"]
    if isinstance(prompt, str):  # v1 release: the whole Llama-3 prompt as one string
        users = _LLAMA_USER.findall(prompt)
        turns = [{"role": "user", "content": u} for u in users]
    elif isinstance(prompt, list) and all(isinstance(t, dict) for t in prompt):
        turns = [t for t in prompt if t.get("role") != "system"]
    else:
        _fail(index, None, f"input is {type(prompt).__name__}, expected chat messages")
    problem = turns[0].get("content") if turns else None
    if len(turns) != 1 or turns[0].get("role") != "user":
        return problem, "", f"{len(turns)} prompt turns (want one user turn)"
    problem = _need_str(problem, "input[user].content", index, problem)
    output = _need_str(raw["output"], "output", index, problem)
    return problem, output.removesuffix("<|eot_id|>"), None


def _from_records(raw: dict, index) -> tuple[str, str, str | None]:
    _need_keys(raw, ("problem", "reasoning"), "records", index)
    problem = _need_str(raw["problem"], "problem", index, raw["problem"])
    return problem, _need_str(raw["reasoning"], "reasoning", index, problem), None


_READERS = {"conversations": _from_conversations, "synthetic1": _from_synthetic1,
            "nemotron": _from_nemotron, "records": _from_records}


def _marker_problem(problem: str, reasoning: str) -> str | None:
    """Why the section spans cannot be found in this record, or None if they can."""
    if THINK in problem or END_THINK in problem:
        return "marker in the problem"
    opens, closes = reasoning.count(THINK), reasoning.count(END_THINK)
    if closes == 0:
        return "no </think>"
    if opens == 0:
        return "no <think>"
    if opens > 1 or closes > 1:
        return "repeated marker"
    start, end = reasoning.index(THINK), reasoning.index(END_THINK)
    if end < start:
        return "</think> before <think>"
    if not reasoning[start + len(THINK):end].strip():
        return "empty thought"
    if not reasoning[end + len(END_THINK):].strip():  # the A section would be template tokens only
        return "empty answer"
    return None


def format_row(raw: dict, schema: str, index=None) -> tuple[dict | None, str | None, bool]:
    """(record or None, why it was dropped, whether <think> was restored)."""
    if schema not in _READERS:
        raise SourceError(f"unknown schema {schema!r}; known: {', '.join(SCHEMAS)}")
    if not isinstance(raw, dict):
        _fail(index, None, f"row is {type(raw).__name__}, expected a mapping")
    problem, reasoning, reason = _READERS[schema](raw, index)
    if reason:
        return None, reason, False
    restored = False
    if schema == "synthetic1" and END_THINK in reasoning and THINK not in reasoning:
        reasoning, restored = f"{THINK}\n{reasoning}", True
    reason = _marker_problem(problem, reasoning)
    if reason:
        return None, reason, False
    given = raw.get("answer") if schema == "records" else None
    answer = given if isinstance(given, str) else last_boxed(reasoning.split(END_THINK, 1)[1]) or ""
    return {"problem": problem, "reasoning": reasoning, "answer": answer}, None, restored


def format_record(raw: dict, schema: str, index: int | None = None) -> dict | None:
    """One raw row in a dataset's own schema -> ``{"problem", "reasoning", "answer"}``.

    Returns None for a row without a usable ``<think>…</think>`` pair (or with a multi-turn
    prompt); raises SourceError (a ValueError) naming ``index`` and the problem when a field is
    not a string or the row does not have the schema's fields.
    """
    return format_row(raw, schema, index)[0]


def infer_schema(columns) -> str:
    """The schema whose fields a dataset's columns carry."""
    cols = set(columns)
    if "conversations" in cols:
        return "conversations"
    if {"prompt", "llm_response"} <= cols:
        return "synthetic1"
    if {"input", "output"} <= cols:
        return "nemotron"
    if {"problem", "reasoning"} <= cols:
        return "records"
    raise SourceError(f"cannot tell the schema from columns {sorted(cols)}; known schemas: "
                      "conversations (system, conversations), synthetic1 (prompt, llm_response), "
                      "nemotron (input, output), records (problem, reasoning, answer)")


def read_json_records(path: Path) -> list[dict]:
    """JSON (one list) or JSONL, with the standard library: no column typing, so a wrong-typed
    field reaches format_record (and is named there) instead of failing inside Arrow."""
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        rows = json.loads(text)
    else:
        rows = []
        for line_no, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    _refuse_one_object(path, text)
                    raise SourceError(f"{path}:{line_no}: not valid JSON ({err})") from err
    not_rows = [i for i, row in enumerate(rows) if not isinstance(row, dict)]
    if not_rows:
        raise SourceError(f"{path}: record(s) {not_rows[:5]} are not JSON objects")
    return rows


def _refuse_one_object(path: Path, text: str) -> None:
    """A file that is one JSON object spread over lines is valid JSON, just not records: say so."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return
    if isinstance(value, dict):
        lists = [k for k, v in value.items() if isinstance(v, list)]
        hint = f"; its list(s) {lists[:3]} may hold the records: save one as a JSON list or JSONL" if lists else ""
        raise SourceError(f"{path}: holds one JSON object (keys {sorted(value)[:5]}), not records: "
                          f"data.source=json reads a JSON list of records or JSONL, one record per line{hint}")


def read_rows(name_or_path: str, source: str, spec: DatasetSpec | None, split: str | None):
    """The raw rows: a list of dicts (a JSON file) or a Dataset (a hub dataset or a folder)."""
    import datasets

    if source == "json":
        path = Path(name_or_path)
        if path.is_dir():
            raise SourceError(f"data.path={name_or_path!r}: is a folder; data.source=json reads one JSON/JSONL "
                              "file (data.source=path reads a folder of data files or a saved dataset)")
        if not path.is_file():
            raise SourceError(f"data.path={name_or_path!r}: no such file; data.source=json reads a JSON/JSONL file")
        return read_json_records(path)
    if source == "path":
        path = Path(name_or_path)
        if not path.is_dir():
            raise SourceError(f"data.path={name_or_path!r}: no such folder; data.source=path reads a saved "
                              "dataset or a folder of data files (data.source=json for one file)")
        saved = any((path / f).exists() for f in ("dataset_info.json", "state.json", "dataset_dict.json"))
        loaded = datasets.load_from_disk(str(path)) if saved else datasets.load_dataset(str(path))
        if isinstance(loaded, (datasets.DatasetDict, dict)):
            wanted = split or (spec.split if spec else "train")
            if wanted not in loaded:
                raise SourceError(f"{name_or_path!r} has splits {sorted(loaded)}, not {wanted!r}")
            loaded = loaded[wanted]
        return loaded
    hub_id, config = (spec.hub_id, spec.config) if spec else (name_or_path, None)
    wanted = split or (spec.split if spec else "train")
    return load_from_hub(hub_id, config, wanted, SourceError, "",
                         "pass a local copy with source='json' (a JSON/JSONL file) or source='path' (a directory)")


def load_from_hub(hub_id: str, config, split: str, error: type, what: str, local_copy: str):
    """``datasets.load_dataset`` by hub id; a failure (offline mode, no cache, no network) raises
    ``error`` saying what failed and how to use a local copy instead (``local_copy``)."""
    import datasets

    try:
        return datasets.load_dataset(hub_id, config, split=split)
    except Exception as err:
        offline = "HF offline mode is on and " if datasets.config.HF_HUB_OFFLINE else ""
        raise error(f"{what}could not load {hub_id!r} (config {config!r}, split {split!r}) from the hub: "
                    f"{offline}{type(err).__name__}: {err}. Load it where the hub is reachable, or "
                    f"{local_copy}") from err


def records_of(table) -> list[dict]:
    """The ``{"problem", "reasoning", "answer"}`` records of a prepared table."""
    return table.select_columns(["problem", "reasoning", "answer"]).to_list()
