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
random later one. With ``packing`` (the default) whole examples are placed into rows of up
to ``seq_len`` tokens best-fit-decreasing (trl's ``pack_dataset``: the longest example
first, each into the row it fills best; none is split), which fills ~99% of a row on
realistic length distributions where placing them in order (first fit, one pass) filled
75-84%. Each example's position ids restart at 0, which makes attention block-diagonal
(transformers derives the mask from the position ids), so packed examples never see each
other; and the first token of every example has label -100, so no example is trained to
follow the one before it in the row. Without packing each example is its own row. Either
way the tail of a row is padding with label -100. Examples longer than ``seq_len`` are
truncated.

Tokenization streams: records are checked in one pass that keeps only the bad ones, then
read again as a stream, tokenized a batch at a time, held as Arrow int32 lists, packed a
group at a time, and the rows written once with ``datasets``' ``ArrowWriter`` as a saved
dataset; the rows returned are that dataset, memory-mapped, so the process holds a group at
a time, not the corpus (``benchmarks/test_bench_data.py``: 1M records, 0.6 GiB of RSS).
"""
from __future__ import annotations

import contextlib
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
    train_truncated: int = 0  # of the training examples (each then fills a row alone)
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


def _data_path(path: str | Path) -> Path:
    """``path`` checked: it exists, and is a JSONL file or a ``datasets`` directory."""
    p = Path(path).expanduser()
    if not p.exists():
        raise BadInputError(f"data {str(p)!r} does not exist; give a .jsonl file (one JSON "
                            "object a line) or a `datasets` directory (save_to_disk)")
    if p.is_file() and p.suffix.lower() not in (".jsonl", ".json", ".ndjson"):
        raise BadInputError(f"data {str(p)!r}: unknown format {p.suffix or '(no extension)'!r}; "
                            "give a .jsonl file (one JSON object a line) or a `datasets` directory")
    return p


def _checked(p: Path, bad: list[BadRecord]) -> Iterator[tuple[str, dict, str]]:
    """``(where, record, format)`` of each well-formed record of ``p`` (the format is the
    first record's); malformed ones go to ``bad``."""
    fmt: str | None = None
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
                yield where, obj, fmt or "text"
    except UnicodeDecodeError as e:
        raise BadInputError(f"data {str(p)!r} is not UTF-8 text ({e.reason} at byte {e.start})") from None


def _refuse_bad(p: Path, good: int, bad: list[BadRecord], skip_bad_lines: bool) -> None:
    if bad and not skip_bad_lines:
        shown = "\n".join(f"  {b}" for b in bad[:MAX_SHOWN])
        more = f"\n  ... and {len(bad) - MAX_SHOWN} more" if len(bad) > MAX_SHOWN else ""
        raise BadInputError(f"{p.name}: {len(bad)} bad record(s); the run did not start. Fix "
                            f"them, or pass --skip-bad-lines to leave them out:\n{shown}{more}")
    if not good:
        raise BadInputError(f"{p.name}: no usable records" + (f" ({len(bad)} bad)" if bad else ""))


def load_records(path: str | Path, *, skip_bad_lines: bool = False
                 ) -> tuple[str, list[tuple[str, dict]], list[BadRecord]]:
    """``(format, [(where, record)], bad records)``; BadInputError on bad records unless
    ``skip_bad_lines``, on a missing or unreadable file, or on no usable record."""
    p = _data_path(path)
    bad: list[BadRecord] = []
    fmt, good = "text", []
    for where, obj, fmt in _checked(p, bad):
        good.append((where, obj))
    _refuse_bad(p, len(good), bad, skip_bad_lines)
    return fmt, good, bad


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
    """``(input_ids, labels)`` of one record (see :func:`tokenize_batch`)."""
    (ids,), (labels,) = tokenize_batch([rec], fmt, tok, completion_only=completion_only)
    return ids, labels


def tokenize_batch(recs: list[dict], fmt: str, tok, *, completion_only: bool
                   ) -> tuple[list[list[int]], list[list[int]]]:
    """``(input_ids, labels)`` of each record, in one call of the (fast) tokenizer.

    Labels are -100 outside the answer when ``completion_only``. An end-of-sequence token
    ends every non-chat example (chat templates end turns themselves) and counts as part
    of the answer. The first token of every example is never a target (label -100): in a
    packed row it would otherwise be trained to follow the previous example's last token
    (alone in a row, the shifted loss never reads it anyway).
    """
    rendered = [render(r, fmt, tok) for r in recs]
    texts = [r[0] for r in rendered]
    special = rendered[0][2] if rendered else True
    enc = tok(texts, add_special_tokens=special, return_offsets_mapping=completion_only)
    eos = tok.eos_token_id
    out_ids, out_labels = [], []
    for i, (_text, spans, _sp) in enumerate(rendered):
        ids = list(enc["input_ids"][i])
        if completion_only:
            labels = []
            for tid, (s, e) in zip(ids, enc["offset_mapping"][i]):
                inside = e > s and any(a <= s < b for a, b in spans)
                labels.append(tid if inside else -100)
        else:
            labels = list(ids)
        if fmt != "chat" and eos is not None and (not ids or ids[-1] != eos):
            ids.append(eos)
            labels.append(eos)
        if labels:
            labels[0] = -100
        out_ids.append(ids)
        out_labels.append(labels)
    return out_ids, out_labels


# ---------------------------------------------------------------------------
# rows
def pack_rows(examples: Iterable[tuple[list[int], list[int]]], seq_len: int, packing: bool
              ) -> list[dict[str, list[int]]]:
    """Rows of at most ``seq_len`` tokens: ``input_ids``, ``labels``, ``position_ids``
    (restarting at 0 for each example). Padding is added when batches are made. The lists
    version of :func:`rows_dataset` (same packing)."""
    from datasets import Dataset

    ex = list(examples)
    if not ex:
        return []
    with _quiet():
        ds = Dataset.from_dict({"input_ids": [e[0] for e in ex], "labels": [e[1] for e in ex]},
                               features=_features())
        return rows_dataset(ds, seq_len, packing).to_list()


def rows_dataset(examples, seq_len: int, packing: bool, *, cache_dir: str | None = None,
                 group: int | None = None):
    """Rows (a ``datasets.Dataset`` with ``input_ids``, ``labels``, ``position_ids``) from a
    dataset of tokenized examples (``input_ids``, ``labels``, each at most ``seq_len``).

    With ``packing``, trl's ``pack_dataset`` places whole examples best-fit-decreasing
    (``"bfd"``) over groups of ``group`` examples (default: all of them); its
    ``seq_lengths`` become position ids restarting at 0 for each example.
    """
    examples = examples.select_columns(["input_ids", "labels"])
    kw = _map_kwargs(cache_dir)
    if not packing:
        return examples.map(_positions_single, batched=True, features=_row_features(), **kw)
    from trl import pack_dataset

    packed = pack_dataset(examples, seq_len, "bfd",
                          {"batch_size": group or max(1, len(examples)), **kw})
    return packed.map(_positions_packed, batched=True, remove_columns=["seq_lengths"],
                      features=_row_features(), **kw)


def _positions_single(batch: dict) -> dict:
    return {"position_ids": [list(range(len(ids))) for ids in batch["input_ids"]]}


def _positions_packed(batch: dict) -> dict:
    return {"position_ids": [[p for n in lengths for p in range(n)]
                             for lengths in batch["seq_lengths"]]}


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


def scan_records(path: str | Path, *, skip_bad_lines: bool = False
                 ) -> tuple[str, int, list[BadRecord]]:
    """One streaming pass over the data: ``(format, good records, bad records)``, keeping
    only the bad ones. BadInputError as :func:`load_records` raises it."""
    p = _data_path(path)
    bad: list[BadRecord] = []
    fmt, good = "text", 0
    for _, _, fmt in _checked(p, bad):
        good += 1
    _refuse_bad(p, good, bad, skip_bad_lines)
    return fmt, good, bad


# Examples packed together (trl's BFD runs over groups of this many, held as Arrow int32
# lists: ~4 bytes a token): larger fills rows a little better and holds more at once.
PACK_GROUP = 20_000
# Records tokenized per call of the tokenizer.
TOKENIZE_BATCH = 1000
DATA_FILE = "data-00000-of-00001.arrow"  # the file name of a one-shard saved dataset


def _int32_lists(*names: str, **more):
    """datasets Features: int32 token lists (4 bytes a token on disk, not Python's ~40)."""
    from datasets import Features, Value

    try:
        from datasets import List  # datasets >= 4
    except ImportError:  # pragma: no cover - datasets 3
        from datasets import Sequence as List
    return Features({**{n: List(Value("int32")) for n in names}, **more})


def _features():
    return _int32_lists("input_ids", "labels")


def _row_features():
    return _int32_lists("input_ids", "labels", "position_ids")


def _map_kwargs(cache_dir: str | None) -> dict:
    """datasets.map arguments: in memory for an in-memory dataset, else a new file in
    ``cache_dir`` (never a stale cache hit)."""
    kw: dict[str, Any] = {"load_from_cache_file": False}
    if cache_dir is not None:
        import uuid

        kw["new_fingerprint"] = uuid.uuid4().hex
        kw["cache_file_name"] = str(Path(cache_dir) / f"{kw['new_fingerprint']}.arrow")
    return kw


def iter_records(path: str | Path, bad: list[BadRecord], batch: int = TOKENIZE_BATCH
                 ) -> Iterator[list[dict]]:
    """The good records of ``path``, a batch at a time, read as a stream (a `datasets`
    directory's Arrow files with plain reads, not a memory map)."""
    p = Path(path).expanduser()
    if p.is_dir():
        import pyarrow as pa
        from datasets import load_from_disk

        ds = load_from_disk(str(p))
        if hasattr(ds, "keys"):
            ds = ds["train"]
        skip = {int(b.where.rsplit("[row ", 1)[1].rstrip("]")) for b in bad}
        files = [f["filename"] for f in ds.cache_files]
        i = 0
        if getattr(ds, "_indices", None) is None and files:
            for f in files:
                with pa.OSFile(f) as src:
                    for rb in pa.ipc.open_stream(src):
                        rows = [r for j, r in enumerate(rb.to_pylist(), start=i) if j not in skip]
                        i += rb.num_rows
                        for k in range(0, len(rows), batch):
                            yield rows[k:k + batch]
            return
        for rb in ds.iter(batch_size=batch):
            n = len(next(iter(rb.values())))
            rows = [{c: rb[c][k] for c in rb} for k in range(n)]
            yield [r for j, r in enumerate(rows, start=i) if j not in skip]
            i += n
        return
    skip = {int(b.where.rsplit(":", 1)[1]) for b in bad}
    out: list[dict] = []
    with p.open(encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if line.strip() and n not in skip:
                out.append(json.loads(line))
                if len(out) == batch:
                    yield out
                    out = []
    if out:
        yield out


class _RowWriter:
    """Packs groups of tokenized examples (held as Arrow) and appends the rows to one Arrow
    file, written like a one-shard ``save_to_disk`` folder."""

    def __init__(self, folder: Path, seq_len: int, packing: bool, summary: "DataSummary",
                 group: int):
        from datasets.arrow_writer import ArrowWriter

        folder.mkdir(parents=True, exist_ok=True)
        self.folder, self.seq_len, self.packing, self.summary = folder, seq_len, packing, summary
        self.group = group
        self.pending: list = []  # Arrow tables of tokenized examples
        self.n_pending = 0
        self.rows = 0
        self.writer = ArrowWriter(features=_row_features(), path=str(folder / DATA_FILE))

    def add(self, table) -> None:
        self.pending.append(table)
        self.n_pending += table.num_rows
        if self.n_pending >= self.group:
            self.flush()

    def flush(self) -> None:
        import pyarrow as pa
        import pyarrow.compute as pc
        from datasets import Dataset

        if not self.n_pending:
            return
        ex = Dataset(pa.concat_tables(self.pending).combine_chunks())
        self.pending, self.n_pending = [], 0
        rows = rows_dataset(ex, self.seq_len, self.packing).data.table
        self.writer.write_table(rows)
        self.rows += rows.num_rows
        if self.summary is not None:
            self.summary.tokens += int(pc.sum(pc.list_value_length(rows["input_ids"])).as_py() or 0)
            self.summary.label_tokens += int(pc.sum(pc.not_equal(
                pc.list_flatten(rows["labels"]), -100)).as_py() or 0)

    def close(self):
        """The rows: a memory-mapped dataset (``len``, indexing, ``save_to_disk``)."""
        from datasets import Dataset

        self.flush()
        self.writer.finalize()
        self.writer.close()
        # state.json and dataset_info.json of a saved dataset: those of a one-row dataset
        # with the same features (one shard, named DATA_FILE), whose data file is then the
        # one written above
        meta = self.folder / ".meta"
        Dataset.from_dict({k: [[0]] for k in _row_features()}, features=_row_features()
                          ).save_to_disk(str(meta))
        state = json.loads((meta / "state.json").read_text())
        assert [f["filename"] for f in state["_data_files"]] == [DATA_FILE], state
        for name in ("state.json", "dataset_info.json"):
            (meta / name).replace(self.folder / name)
        import shutil

        shutil.rmtree(meta)
        ds = Dataset.from_file(str(self.folder / DATA_FILE))
        ds._qplan_folder = self.folder
        return ds


def _table(ids: list[list[int]], labels: list[list[int]]):
    import pyarrow as pa

    t = pa.list_(pa.int32())
    return pa.table({"input_ids": pa.array(ids, type=t), "labels": pa.array(labels, type=t)})


@contextlib.contextmanager
def _quiet():
    """No datasets progress bars while qplan prints its own lines."""
    import datasets

    shown = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if shown:
            datasets.enable_progress_bars()


def prepare(path: str | Path, tok, *, seq_len: int, completion_only: bool = False,
            skip_bad_lines: bool = False, packing: bool = True, eval_fraction: float = 0.0,
            seed: int = 0, cache_dir: str | Path | None = None
            ) -> tuple[Any, Any, DataSummary, list[BadRecord]]:
    """``(train rows, eval rows, summary, bad records)`` for the data at ``path``.

    The rows are ``datasets.Dataset`` objects (``input_ids``, ``labels``, ``position_ids``;
    ``len()``, indexing and iteration as a list of dicts), memory-mapped from one Arrow file
    each, written a group of examples at a time into ``cache_dir/train`` and ``.../eval``
    (default: a temporary folder removed with the datasets): folders ``load_from_disk``
    reads. ``eval_fraction`` > 0 holds out that share of the records (at least one) for
    evaluation, chosen with ``seed``.
    """
    with _quiet():
        return _prepare(path, tok, seq_len=seq_len, completion_only=completion_only,
                        skip_bad_lines=skip_bad_lines, packing=packing,
                        eval_fraction=eval_fraction, seed=seed, cache_dir=cache_dir)


def _prepare(path, tok, *, seq_len, completion_only, skip_bad_lines, packing, eval_fraction,
             seed, cache_dir):
    fmt, good, bad = scan_records(path, skip_bad_lines=skip_bad_lines)
    if completion_only and fmt == "text":
        raise BadInputError(f"--completion-only needs to know where the answer starts, but "
                            f"{Path(path).name} holds plain 'text' records; use prompt/completion, "
                            "Alpaca (instruction/input/output) or chat (messages) records")
    if fmt == "chat" and not getattr(tok, "chat_template", None):
        raise BadInputError(f"{Path(path).name} holds chat records but the model's tokenizer has no "
                            "chat template; use a tokenizer with one (tokenizer_config.json "
                            "'chat_template') or give text / Alpaca records")
    summary = DataSummary(source=str(path), format=fmt, records=good, bad_skipped=len(bad),
                          packing=packing, completion_only=completion_only)
    if bad:
        summary.notes.append(f"skipped {len(bad)} bad record(s), first: {bad[0]}")
    held = _held_out(good, eval_fraction, seed)
    tmp = None
    if cache_dir is None:
        import tempfile

        tmp = tempfile.TemporaryDirectory(prefix="qplan-data-")
        cache_dir = tmp.name
    root = Path(cache_dir)
    train = _RowWriter(root / "train", seq_len, packing, summary, PACK_GROUP)
    ev = _RowWriter(root / "eval", seq_len, packing, None, PACK_GROUP) if held else None
    index = 0
    for recs in iter_records(path, bad):
        ids, labels = tokenize_batch(recs, fmt, tok, completion_only=completion_only)
        keep: dict[bool, tuple[list, list]] = {False: ([], []), True: ([], [])}
        for x, y in zip(ids, labels):
            cut = len(x) > seq_len
            if cut:
                summary.truncated += 1
                x, y = x[:seq_len], y[:seq_len]
            if any(t != -100 for t in y[1:]):
                side = keep[index in held]
                side[0].append(x)
                side[1].append(y)
                summary.examples += index not in held
                summary.train_truncated += cut and index not in held
            else:
                summary.dropped_no_labels += 1
            index += 1
        if keep[False][0]:
            train.add(_table(*keep[False]))
        if ev is not None and keep[True][0]:
            ev.add(_table(*keep[True]))
    _note_cuts(summary, seq_len)
    if not summary.examples:
        raise BadInputError(f"{Path(path).name}: no example has tokens to learn from "
                            f"at --seq {seq_len}")
    rows = train.close()
    summary.rows = len(rows)
    evr = ev.close() if ev is not None else []
    if tmp is not None:  # the folder goes when the last of the datasets does
        rows._qplan_tmp = tmp
        if ev is not None:
            evr._qplan_tmp = tmp
    return rows, evr, summary, bad


def _held_out(good: int, eval_fraction: float, seed: int) -> set[int]:
    """Indices of the records held out for evaluation (``--eval-split``)."""
    if eval_fraction <= 0:
        return set()
    if good < 2:
        raise BadInputError("--eval-split needs at least 2 examples")
    order = list(range(good))
    random.Random(seed).shuffle(order)
    return set(order[:min(good - 1, max(1, round(eval_fraction * good)))])


def _note_cuts(summary: DataSummary, seq_len: int) -> None:
    if summary.truncated:
        summary.notes.append(f"{summary.truncated} example(s) longer than {seq_len} tokens were truncated")
    if summary.dropped_no_labels:
        summary.notes.append(f"{summary.dropped_no_labels} example(s) had no answer tokens left "
                             "after truncation and were dropped")


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
