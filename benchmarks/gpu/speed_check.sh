#!/bin/bash
# One GPU-machine call (2 H200s) of issue 13's speed check (benchmarks/speed_check.py): the
# items of benchmarks/speed_check_items.json not yet measured (an "ok" record in
# benchmarks/results/raw/h200_speed_check*.jsonl) in two halves, one per GPU at the same time,
# each configuration in its own fresh process (speed_grid.py --repeat). Writes under $OUT:
# h200_speed_check_<call>_{a,b}.jsonl and their logs. Run from the repository root after
# installing the wheels (PYTHONPATH set). Usage: speed_check.sh CALL [DEADLINE_S]
set -u
OUT=${OUT:?}
CALL=${1:?call name}
DEADLINE=${2:-520}
python3 - <<'PY'
import glob, json
items = json.load(open("benchmarks/speed_check_items.json"))
done = set()
for p in glob.glob("benchmarks/results/raw/h200_speed_check*.jsonl"):
    for line in open(p):
        r = json.loads(line)
        if r.get("status") == "ok":
            done.add(r["item"])
todo = [i for i in items if i["name"] not in done]
# half a: the Llama-3.1-8B and Qwen3-4B pairs, the seeds, the first held-out models; half b:
# the rest (about the same time: builds take 16-43 s, processes 25-40 s)
first_a = {"llama-3.1-8b@rtx-4090", "qwen3-4b@rtx-4070"}
held = [i for i in todo if i["part"] == "heldout"]
a = [i for i in todo if i.get("pair") in first_a or i["part"] == "seeds"] + held[:3]
b = [i for i in todo if i not in a]
for name, part in (("a", a), ("b", b)):
    json.dump(part, open(f"/tmp/speed_check_{name}.json", "w"))
    print(name, len(part), "items")
PY
for h in a b; do
  gpu=$([ $h = a ] && echo 0 || echo 1)
  CUDA_VISIBLE_DEVICES=$gpu python3 benchmarks/speed_grid.py --repeat /tmp/speed_check_$h.json \
    --times 1 --steps 6 --warmup 3 --deadline $DEADLINE \
    --out $OUT/h200_speed_check_${CALL}_$h.jsonl --log $OUT/log_${CALL}_$h.txt > /dev/null 2>&1 &
done
wait
