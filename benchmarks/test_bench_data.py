"""Tokenizing and packing a large dataset keeps the process's memory flat.

``qplan.runner.data.prepare`` on ``QPLAN_BENCH_RECORDS`` Alpaca records (default 1,000,000:
~370 MB of JSONL, ~85M tokens with the tests' word-level tokenizer, completion-only labels,
rows of 1024 tokens) in a fresh process, sampling its resident memory every 20 ms
(/proc/self/status: VmRSS, and its anonymous and file-backed parts). The bar: the peak
RSS stays under 1 GiB. The earlier version held every example as Python lists (about 95
bytes a token: ~8 GB for these 85M tokens). About 5 minutes on 2 CPU cores for 1M records
(most of it in the tokenizer); results in ``benchmarks/results/data_rss.json``.

    pytest benchmarks/test_bench_data.py -s                  # 1M records
    QPLAN_BENCH_RECORDS=100000 pytest benchmarks/test_bench_data.py -s
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RECORDS = int(os.environ.get("QPLAN_BENCH_RECORDS", "1000000"))
LIMIT_GIB = 1.0
RESULT = ROOT / "benchmarks" / "results" / "data_rss.json"

CHILD = r'''
import json, shutil, sys, threading, time
from transformers import AutoTokenizer
from qplan.runner import data as D

keys = ("VmRSS", "RssAnon", "RssFile")
peak = dict.fromkeys(keys, 0)

def status():
    out = {}
    for line in open("/proc/self/status"):
        k, _, v = line.partition(":")
        if k in keys:
            out[k] = int(v.split()[0]) * 1024
    return out

def sample():
    while True:
        for k, v in status().items():
            peak[k] = max(peak[k], v)
        time.sleep(0.02)

threading.Thread(target=sample, daemon=True).start()
data, tok_dir, out = sys.argv[1:4]
tok = AutoTokenizer.from_pretrained(tok_dir)
base = status()
t = time.time()
rows, ev, s, bad = D.prepare(data, tok, seq_len=1024, completion_only=True, cache_dir=out)
seconds = time.time() - t
time.sleep(0.1)
print(json.dumps({"seconds": round(seconds, 1), "records": s.records, "examples": s.examples,
                  "rows": s.rows, "tokens": s.tokens, "label_tokens": s.label_tokens,
                  "fill": round(s.tokens / (s.rows * 1024), 4),
                  "base_gib": {k: round(v / 2**30, 3) for k, v in base.items()},
                  "peak_gib": {k: round(v / 2**30, 3) for k, v in peak.items()}}))
'''


def write_records(path: Path, n: int) -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    from fixtures.tiny_llama import WORDS

    rnd = random.Random(0)
    with path.open("w") as f:
        for _ in range(n):
            q = " ".join(rnd.choice(WORDS) for _ in range(rnd.randint(5, 30)))
            k = max(1, int(min(400, rnd.lognormvariate(3.5, 0.8))))
            a = " ".join(rnd.choice(WORDS) for _ in range(k))
            f.write(json.dumps({"instruction": q, "input": "", "output": a}) + "\n")


@pytest.mark.slow
def test_tokenizing_a_large_dataset_keeps_rss_under_1_gib(tmp_path):
    sys.path.insert(0, str(ROOT / "tests"))
    from fixtures.tiny_llama import build

    tiny = build(tmp_path / "tiny")
    data = tmp_path / "train.jsonl"
    write_records(data, RECORDS)
    r = subprocess.run([sys.executable, "-c", CHILD, str(data), str(tiny), str(tmp_path / "rows")],
                       capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    res["jsonl_mib"] = round(data.stat().st_size / 2**20, 1)
    print(json.dumps(res, indent=1))
    assert res["records"] == RECORDS and res["fill"] >= 0.97
    assert res["peak_gib"]["VmRSS"] < LIMIT_GIB, res
    if RECORDS == 1_000_000 and os.environ.get("QPLAN_BENCH_SAVE") == "1":
        RESULT.write_text(json.dumps(res, indent=1) + "\n")
