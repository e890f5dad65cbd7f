"""Training data: read, check, tokenize, mask and pack it into fixed-length rows.

Formats (one JSON object a line, or the rows of a ``datasets`` dataset directory):

* ``text``: ``{"text": "..."}``, loss on every token.
* ``prompt_completion``: ``{"prompt": "...", "completion": "..."}``.
* ``alpaca``: ``{"instruction": "...", "input": "...", "output": "..."}`` (``input``
  optional), rendered with the Alpaca prompt (:data:`ALPACA_PROMPT`).
* ``chat``: ``{"messages": [{"role": "user", "content": "..."}, ...]}``, rendered with
  the tokenizer's chat template.

The file's format is that of its first well-formed line; every line is checked before
anything runs, and a bad line is reported as ``file:line: what is wrong``.
``completion_only``: the loss is taken on the answer only (the completion, the Alpaca
output, the assistant messages); every other token gets label -100.

Rows: every micro-batch the runner feeds has exactly ``seq_len`` tokens per row, the
shape the planner estimated, so the peak memory shows at the first step instead of at a
random later one. With ``packing`` (the default) whole examples are put one after
another into rows of up to ``seq_len`` tokens (an example that does not fit starts a new
row; none is split); each example's position ids restart at 0, which makes attention
block-diagonal (transformers derives the mask from the position ids), so packed
examples never see each other. Without packing each example is its own row. Either way
the tail of a row is padding with label -100. Examples longer than ``seq_len`` are
truncated.
"""
from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from qplan.errors import BadInputError

FORMATS = ("text", "prompt_completion", "alpaca", "chat")
ROLES = ("system", "user", "assistant", "tool")
ALPACA_PROMPT = (
    "Below is an instruction that describes a task{with_input}. Write a response that "
    "appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n"
    "{input_block}### Response:\n")
MAX_SHOWN = 10  # bad lines listed in the error message


@dataclass(frozen=True)
class BadRecord:
    where: str  # "train.jsonl:7" or "data/[row 7]"
    problem: str

    def __str__(self) -> str:
        return f"{self.where}: {self.problem}"


@dataclass
class DataSummary:
    """What became of the data: counts for the report."""

    source: str
    format: str
    records: int = 0  # well-formed records read
    bad_skipped: int = 0
    examples: int = 0  # tokenized examples kept
    truncated: int = 0  # examples longer than seq_len, cut
    dropped_no_labels: int = 0  # nothing left to learn after masking/truncation
    rows: int = 0
    tokens: int = 0  # real (non-padding) tokens in the rows
    label_tokens: int = 0
    packing: bool = True
    completion_only: bool = False
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------
# reading and checking
def _records(path: Path) -> Iterator[tuple[str, Any]]:
    """``(where, parsed object or BadRecord problem string)`` for each record of ``path``."""
    if path.is_dir():
        yield from _dataset_records(path)
        return
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path.name}:{n}"
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as e:
                yield where, BadRecord(where, f"not valid JSON ({e.msg} at column {e.colno})")


def _dataset_records(path: Path) -> Iterator[tuple[str, Any]]:
    if not (path / "dataset_info.json").is_file() and not (path / "dataset_dict.json").is_file():
        raise BadInputError(f"{path} is a directory but not a saved `datasets` dataset "
                            "(no dataset_info.json or dataset_dict.json; save one with "
                            "Dataset.save_to_disk), nor a file; give a .jsonl file or such a directory")
    from datasets import DatasetDict, load_from_disk

    ds = load_from_disk(str(path))
    if isinstance(ds, DatasetDict):
        if "train" not in ds:
            raise BadInputError(f"{path}: the dataset has splits {', '.join(ds)} but no 'train'")
        ds = ds["train"]
    for i, row in enumerate(ds):
        yield f"{path.name}[row {i}]", row


def detect_format(obj: Any) -> str | None:
    if not isinstance(obj, dict):
        return None
    if "messages" in obj:
        return "chat"
    if "instruction" in obj or "output" in obj:
        return "alpaca"
    if "prompt" in obj or "completion" in obj:
        return "prompt_completion"
    if "text" in obj:
        return "text"
    return None


def _nonempty_str(obj: dict, key: str) -> str | None:
    v = obj.get(key)
    if v is None:
        return f"missing {key!r}"
    if not isinstance(v, str):
        return f"{key!r} must be a string (got {type(v).__name__})"
    if not v.strip():
        return f"{key!r} is empty"
    return None


def check_record(obj: Any, fmt: str) -> str | None:
    """What is wrong with ``obj`` as a record of format ``fmt`` (None if nothing)."""
    if not isinstance(obj, dict):
        return f"expected a JSON object, got {type(obj).__name__}"
    got = detect_format(obj)
    if got is None:
        return ("no known fields: expected 'text', 'prompt'/'completion', "
                "'instruction'/'output' (Alpaca) or 'messages' (chat); got "
                f"{', '.join(sorted(obj)) or 'an empty object'}")
    if got != fmt:
        return f"a {got} record in a {fmt} file (the first record decides the format)"
    if fmt == "text":
        return _nonempty_str(obj, "text")
    if fmt == "prompt_completion":
        return _nonempty_str(obj, "prompt") or _nonempty_str(obj, "completion")
    if fmt == "alpaca":
        p = _nonempty_str(obj, "instruction") or _nonempty_str(obj, "output")
        if p is None and obj.get("input") is not None and not isinstance(obj["input"], str):
            p = f"'input' must be a string (got {type(obj['input']).__name__})"
        return p
    msgs = obj.get("messages")
    if not isinstance(msgs, list) or not msgs:
        return "'messages' must be a non-empty list of {\"role\", \"content\"} objects"
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            return f"message {i} must be an object with 'role' and 'content'"
        if m["role"] not in ROLES:
            return f"message {i} has role {m['role']!r}; use one of {', '.join(ROLES)}"
        if not isinstance(m["content"], str):
            return f"message {i}: 'content' must be a string (got {type(m['content']).__name__})"
    if not any(m["role"] == "assistant" for m in msgs):
        return "no assistant message: nothing to learn"
    return None


def load_records(path: str | Path, *, skip_bad_lines: bool = False
                 ) -> tuple[str, list[tuple[str, dict]], list[BadRecord]]:
    """``(format, [(where, record)], bad records)``; BadInputError on bad records unless
    ``skip_bad_lines``, on a missing or unreadable file, or on no usable record."""
    p = Path(path).expanduser()
    if not p.exists():
        raise BadInputError(f"data {str(p)!r} does not exist; give a .jsonl file (one JSON "
                            "object a line) or a `datasets` directory (save_to_disk)")
    if p.is_file() and p.suffix.lower() not in (".jsonl", ".json", ".ndjson"):
        raise BadInputError(f"data {str(p)!r}: unknown format {p.suffix or '(no extension)'!r}; "
                            "give a .jsonl file (one JSON object a line) or a `datasets` directory")
    fmt: str | None = None
    good: list[tuple[str, dict]] = []
    bad: list[BadRecord] = []
    try:
        for where, obj in _records(p):
            if isinstance(obj, BadRecord):
                bad.append(obj)
                continue
            if fmt is None:
                fmt = detect_format(obj)
            problem = check_record(obj, fmt) if fmt else check_record(obj, "text")
            if problem:
                bad.append(BadRecord(where, problem))
            else:
                good.append((where, obj))
    except UnicodeDecodeError as e:
        raise BadInputError(f"data {str(p)!r} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    if bad and not skip_bad_lines:
        shown = "\n".join(f"  {b}" for b in bad[:MAX_SHOWN])
        more = f"\n  ... and {len(bad) - MAX_SHOWN} more" if len(bad) > MAX_SHOWN else ""
        raise BadInputError(f"{p.name}: {len(bad)} bad record(s); the run did not start. Fix "
                            f"them, or pass --skip-bad-lines to leave them out:\n{shown}{more}")
    if not good:
        raise BadInputError(f"{p.name}: no usable records" + (f" ({len(bad)} bad)" if bad else ""))
    return fmt or "text", good, bad


# ---------------------------------------------------------------------------
# rendering and tokenizing
def alpaca_prompt(rec: dict) -> str:
    inp = (rec.get("input") or "").strip()
    return ALPACA_PROMPT.format(
        with_input=", paired with an input that provides further context" if inp else "",
        instruction=rec["instruction"], input_block=f"### Input:\n{inp}\n\n" if inp else "")


def _chat_spans(tok, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of the assistant turns."""
    full = tok.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = tok.apply_chat_template(messages[:i], tokenize=False,
                                         add_generation_prompt=True) if i else ""
        through = tok.apply_chat_template(messages[:i + 1], tokenize=False)
        if not (full.startswith(through) and through.startswith(before)):
            raise BadInputError(
                "the tokenizer's chat template does not render a conversation as a prefix of "
                "its continuation, so the assistant turns cannot be located for "
                "--completion-only; train without --completion-only, or use a template that does")
        spans.append((len(before), len(through)))
    return full, spans


def render(rec: dict, fmt: str, tok) -> tuple[str, list[tuple[int, int]], bool]:
    """``(text, answer character spans, add special tokens)`` for one record."""
    if fmt == "text":
        return rec["text"], [(0, len(rec["text"]))], True
    if fmt == "prompt_completion":
        return rec["prompt"] + rec["completion"], [(len(rec["prompt"]), len(rec["prompt"]) +
                                                    len(rec["completion"]))], True
    if fmt == "alpaca":
        prompt = alpaca_prompt(rec)
        return prompt + rec["output"], [(len(prompt), len(prompt) + len(rec["output"]))], True
    text, spans = _chat_spans(tok, rec["messages"])
    return text, spans, False


def tokenize(rec: dict, fmt: str, tok, *, completion_only: bool) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` of one record: labels -100 outside the answer when
    ``completion_only``. An end-of-sequence token ends every non-chat example (chat
    templates end turns themselves) and counts as part of the answer."""
    text, spans, special = render(rec, fmt, tok)
    enc = tok(text, add_special_tokens=special, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    if completion_only:
        labels = []
        for tid, (s, e) in zip(ids, enc["offset_mapping"]):
            inside = e > s and any(a <= s < b for a, b in spans)
            labels.append(tid if inside else -100)
    else:
        labels = list(ids)
    eos = tok.eos_token_id
    if fmt != "chat" and eos is not None and (not ids or ids[-1] != eos):
        ids.append(eos)
        labels.append(eos)
    return ids, labels


# ---------------------------------------------------------------------------
# rows
def pack_rows(examples: Iterable[tuple[list[int], list[int]]], seq_len: int, packing: bool
              ) -> list[dict[str, list[int]]]:
    """Rows of at most ``seq_len`` tokens: ``input_ids``, ``labels``, ``position_ids``
    (restarting at 0 for each example). Padding is added when batches are made."""
    rows: list[dict[str, list[int]]] = []
    cur: dict[str, list[int]] | None = None
    for ids, labels in examples:
        if cur is None or not packing or len(cur["input_ids"]) + len(ids) > seq_len:
            cur = {"input_ids": [], "labels": [], "position_ids": []}
            rows.append(cur)
        cur["input_ids"] += ids
        cur["labels"] += labels
        cur["position_ids"] += list(range(len(ids)))
    return rows


def pad_row(row: dict[str, list[int]], seq_len: int, pad_id: int) -> dict[str, list[int]]:
    """``row`` cut or padded to exactly ``seq_len`` tokens. Padding has label -100 and its
    own position ids (0, 1, ...), so it forms a separate block that nothing attends to."""
    ids, labels, pos = (row[k][:seq_len] for k in ("input_ids", "labels", "position_ids"))
    n = seq_len - len(ids)
    return {"input_ids": ids + [pad_id] * n, "labels": labels + [-100] * n,
            "position_ids": pos + list(range(n))}


def pad_token_id(tok) -> int:
    for t in (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id):
        if t is not None:
            return int(t)
    return 0


def prepare(path: str | Path, tok, *, seq_len: int, completion_only: bool = False,
            skip_bad_lines: bool = False, packing: bool = True, eval_fraction: float = 0.0,
            seed: int = 0) -> tuple[list[dict], list[dict], DataSummary, list[BadRecord]]:
    """``(train rows, eval rows, summary, bad records)`` for the data at ``path``.

    ``eval_fraction`` > 0 holds out that share of the examples (at least one) for evaluation,
    chosen with ``seed``.
    """
    fmt, records, bad = load_records(path, skip_bad_lines=skip_bad_lines)
    if completion_only and fmt == "text":
        raise BadInputError(f"--completion-only needs to know where the answer starts, but "
                            f"{Path(path).name} holds plain 'text' records; use prompt/completion, "
                            "Alpaca (instruction/input/output) or chat (messages) records")
    if fmt == "chat" and not getattr(tok, "chat_template", None):
        raise BadInputError(f"{Path(path).name} holds chat records but the model's tokenizer has no "
                            "chat template; use a tokenizer with one (tokenizer_config.json "
                            "'chat_template') or give text / Alpaca records")
    summary = DataSummary(source=str(path), format=fmt, records=len(records),
                          bad_skipped=len(bad), packing=packing, completion_only=completion_only)
    if bad:
        summary.notes.append(f"skipped {len(bad)} bad record(s), first: {bad[0]}")
    examples = []
    for _, rec in records:
        ids, labels = tokenize(rec, fmt, tok, completion_only=completion_only)
        if len(ids) > seq_len:
            summary.truncated += 1
            ids, labels = ids[:seq_len], labels[:seq_len]
        if not any(x != -100 for x in labels[1:]):
            summary.dropped_no_labels += 1
            continue
        examples.append((ids, labels))
    if summary.truncated:
        summary.notes.append(f"{summary.truncated} example(s) longer than {seq_len} tokens were truncated")
    if summary.dropped_no_labels:
        summary.notes.append(f"{summary.dropped_no_labels} example(s) had no answer tokens left "
                             "after truncation and were dropped")
    if not examples:
        raise BadInputError(f"{Path(path).name}: no example has tokens to learn from "
                            f"at --seq {seq_len}")
    ev: list = []
    if eval_fraction > 0:
        if len(examples) < 2:
            raise BadInputError("--eval-split needs at least 2 examples")
        order = list(range(len(examples)))
        random.Random(seed).shuffle(order)
        k = min(len(examples) - 1, max(1, round(eval_fraction * len(examples))))
        held = set(order[:k])
        ev = [e for i, e in enumerate(examples) if i in held]
        examples = [e for i, e in enumerate(examples) if i not in held]
    summary.examples = len(examples)
    rows = pack_rows(examples, seq_len, packing)
    summary.rows = len(rows)
    summary.tokens = sum(len(r["input_ids"]) for r in rows)
    summary.label_tokens = sum(sum(1 for x in r["labels"] if x != -100) for r in rows)
    return rows, pack_rows(ev, seq_len, packing), summary, bad


def step_order(n_rows: int, count: int, seed: int) -> list[int]:
    """The fixed sequence of row indices a run consumes: epochs of seeded permutations of
    the rows, cut at ``count``. Optimizer step k (0-based) takes positions
    ``[k*E, (k+1)*E)``, whatever the per-device batch."""
    out: list[int] = []
    epoch = 0
    while len(out) < count:
        perm = list(range(n_rows))
        random.Random(f"{seed}/{epoch}").shuffle(perm)
        out += perm
        epoch += 1
    return out[:count]
