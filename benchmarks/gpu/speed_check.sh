#!/bin/bash
# One GPU-machine call (2 H200s) of issue 13's speed check (benchmarks/speed_check.py): the
# items of benchmarks/speed_check_items.json not yet measured (an "ok" record in
# benchmarks/results/raw/h200_speed_check*.jsonl) in two halves, one per GPU at the same time,
# each configuration in its own fresh process (speed_grid.py --repeat). Writes under $OUT:
# h200_speed_check_<call>_{a,b}.jsonl and their logs. Run from the repository root after
# installing the wheels (PYTHONPATH set). Usage: [A=models,of,half,a] [REDO=items] [SKIP=items]
# [HALVES='a b'] [TIMES=1]
# speed_check.sh CALL [DEADLINE_S]; call c1 ran 3 warm-up and 6 timed steps (STEPS=6 WARMUP=3)
set -u
OUT=${OUT:?}
CALL=${1:?call name}
DEADLINE=${2:-520}
python3 - <<'PY'
import glob, json, os
items = json.load(open("benchmarks/speed_check_items.json"))
redo = set(filter(None, os.environ.get("REDO", "").split(",")))  # measured again
skip = set(filter(None, os.environ.get("SKIP", "").split(",")))  # not this call
done = set()
for p in glob.glob("benchmarks/results/raw/h200_speed_check*.jsonl"):
    for line in open(p):
        r = json.loads(line)
        if r.get("status") == "ok":
            done.add(r["item"])
todo = [i for i in items if (i["name"] not in done or i["name"] in redo) and i["name"] not in skip]
# half a: the models named in A (by model: a build serves all its items), the rest half b;
# each half in that order, the redone ones first
A = set(os.environ.get("A", "llama-3.1-8b,qwen3-4b").split(","))
# a model's items together (its build serves them, then its disk is freed), in the order of
# their first item
first = {}
for i in todo:
    first.setdefault((i["model"], i["layers"]), len(first))
todo.sort(key=lambda i: (i["name"] not in redo, first[(i["model"], i["layers"])]))
a = [i for i in todo if i["model"] in A]
b = [i for i in todo if i["model"] not in A]
for name, part in (("a", a), ("b", b)):
    json.dump(part, open(f"/tmp/speed_check_{name}.json", "w"))
    print(name, len(part), "items:", " ".join(i["name"] for i in part))
PY
for h in ${HALVES:-a b}; do
  gpu=$([ $h = a ] && echo 0 || echo 1)
  CUDA_VISIBLE_DEVICES=$gpu python3 benchmarks/speed_grid.py --repeat /tmp/speed_check_$h.json \
    --times ${TIMES:-1} --steps ${STEPS:-4} --warmup ${WARMUP:-2} --deadline $DEADLINE \
    --out $OUT/h200_speed_check_${CALL}_$h.jsonl --log $OUT/log_${CALL}_$h.txt > /dev/null 2>&1 &
done
wait
