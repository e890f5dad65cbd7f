"""The data path: best-fit-decreasing packing (trl's pack_dataset) against the first fit it
replaced, the first-token label of packed examples, and streamed tokenization into Arrow."""
from __future__ import annotations

import random

import pytest

from fixtures import tiny_llama as TL
from qplan.runner import data as D

SEQ = 2048


def first_fit_rows(lengths: list[int], seq_len: int) -> int:
    """Rows the old one-pass packing made: each example into the current row, else a new one."""
    rows, cur = 0, None
    for n in lengths:
        if cur is None or cur + n > seq_len:
            rows, cur = rows + 1, 0
        cur += n
    return rows


def synthetic(lengths: list[int]):
    from datasets import Dataset

    ids = [[7] * n for n in lengths]
    return Dataset.from_dict({"input_ids": ids, "labels": ids}, features=D._features())


def lognormal(n: int, seed: int = 0) -> list[int]:
    rnd = random.Random(seed)  # median ~400 tokens, a long tail, cut at the row length
    return [max(8, min(SEQ, int(rnd.lognormvariate(6.0, 0.9)))) for _ in range(n)]


def uniform(n: int, seed: int = 0) -> list[int]:
    rnd = random.Random(seed)
    return [rnd.randint(16, SEQ) for _ in range(n)]


@pytest.mark.parametrize("dist", [lognormal, uniform])
def test_best_fit_decreasing_fills_rows(dist, tmp_path):
    lengths = dist(6000)
    rows = D.rows_dataset(synthetic(lengths), SEQ, packing=True, cache_dir=str(tmp_path))
    fill = sum(lengths) / (len(rows) * SEQ)
    old = sum(lengths) / (first_fit_rows(lengths, SEQ) * SEQ)
    assert fill >= 0.97, f"{dist.__name__}: rows {fill:.1%} full"
    assert old < 0.90 and fill > old  # what the one-pass packing left
    # every example whole in one row: the restarts of the position ids are its boundaries
    got = sorted(n for r in rows for n in _spans(r["position_ids"]))
    assert got == sorted(lengths)


def _spans(pos: list[int]) -> list[int]:
    starts = [i for i, p in enumerate(pos) if p == 0] + [len(pos)]
    return [b - a for a, b in zip(starts, starts[1:])]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return TL.build(tmp_path_factory.mktemp("tiny") / "tiny")


@pytest.fixture(scope="module")
def tok(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def test_the_first_token_of_a_packed_example_is_not_a_target(model_dir, tok, tmp_path):
    """A packed row's loss is the examples' losses alone: no example learns to follow the
    previous one's end-of-sequence token."""
    import torch
    from transformers import AutoModelForCausalLM

    texts = ["the quick brown fox", "seven small cats sing", "red apples blue rivers"]
    p = TL.write_jsonl(tmp_path / "t.jsonl", [{"text": t} for t in texts])
    rows, _, summary, _ = D.prepare(p, tok, seq_len=64, packing=True)
    assert len(rows) == 1
    row = rows[0]
    starts = [i for i, x in enumerate(row["position_ids"]) if x == 0]
    assert len(starts) == 3 and all(row["labels"][i] == -100 for i in starts)
    m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")

    def loss_sum(ids, labels, pos=None):
        # use_cache=False, as in training: with a cache transformers builds no packed mask
        out = m(input_ids=torch.tensor([ids]), labels=torch.tensor([labels]), use_cache=False,
                position_ids=None if pos is None else torch.tensor([pos]))
        n = sum(1 for y in labels[1:] if y != -100)
        return float(out.loss) * n, n

    with torch.no_grad():
        packed, n_packed = loss_sum(row["input_ids"], row["labels"], row["position_ids"])
        alone = [loss_sum(*D.tokenize({"text": t}, "text", tok, completion_only=False)) for t in texts]
    assert n_packed == sum(n for _, n in alone) == summary.label_tokens
    assert packed == pytest.approx(sum(x for x, _ in alone), rel=1e-4)


def test_tokenized_rows_are_int32_arrow_on_disk(tok, tmp_path):
    p = TL.write_jsonl(tmp_path / "a.jsonl", TL.alpaca_records(50))
    rows, ev, s, _ = D.prepare(p, tok, seq_len=64, completion_only=True, eval_fraction=0.1,
                               cache_dir=tmp_path / "cache")
    from datasets import Dataset

    assert isinstance(rows, Dataset) and rows.cache_files  # memory-mapped, not in RAM
    assert all(str(f["filename"]).startswith(str(tmp_path / "cache")) for f in rows.cache_files)
    assert rows.features["input_ids"].feature.dtype == "int32"
    assert s.examples == 45 and len(ev) >= 1
    assert sum(len(r["input_ids"]) for r in rows) == s.tokens


def test_prepare_matches_tokenizing_one_record_at_a_time(tok, tmp_path):
    recs = TL.alpaca_records(30)
    p = TL.write_jsonl(tmp_path / "a.jsonl", recs)
    rows, _, _, _ = D.prepare(p, tok, seq_len=64, completion_only=True, packing=False)
    one = sorted(tuple(D.tokenize(r, "alpaca", tok, completion_only=True)[1]) for r in recs)
    assert sorted(tuple(r["labels"]) for r in rows) == one
