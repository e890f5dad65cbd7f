#!/bin/bash
# One GPU-machine call (2 GPUs): does `qplan export --format trl` of an FSDP plan with CPU
# offload train as written? llama-3.2-1b (random weights, catalogue shape): qplan suggest
# --gpus 2 --strategy fsdp --offload-params --save, qplan export --format trl, then
# `accelerate launch --config_file accelerate_config.yaml train_trl.py --max-steps 3`.
# Writes $OUT/export_check.log and the exported files. Needs PYTHONPATH with the wheels.
set -u
OUT=${OUT:?}
W=/tmp/qplan-export-check
rm -rf $W && mkdir -p $W
python3 -c "import sys; sys.path[:0]=['benchmarks']; from pathlib import Path; import memory_grid as g; g.build_model('llama-3.2-1b', None, Path('$W/model'), 'cuda')" > $OUT/export_check.log 2>&1
python3 -c "
import json, random
r = random.Random(0)
words = open('$W/model/tokenizer.json').read()[:0] or ['the', 'a', 'model', 'trains', 'on', 'text']
with open('$W/train.jsonl', 'w') as f:
    for i in range(64):
        f.write(json.dumps({'text': ' '.join(r.choice(words) for _ in range(400))}) + '\n')
"
python3 -m qplan suggest --model llama-3.2-1b --gpu h200 --gpus 2 --strategy fsdp \
  --offload-params --target-batch 4 --save $W/plan.yaml >> $OUT/export_check.log 2>&1
python3 -m qplan export --plan $W/plan.yaml --format trl -o $W/train_trl.py >> $OUT/export_check.log 2>&1
sed -i "s|^MODEL = .*|MODEL = '$W/model'|" $W/train_trl.py
cp $W/train_trl.py $W/accelerate_config.yaml $W/plan.yaml $OUT/ 2>/dev/null
cd $W && timeout -s KILL ${LIMIT:-200} python3 -m accelerate.commands.launch \
  --config_file accelerate_config.yaml train_trl.py --data train.jsonl --max-steps 3 \
  --output $W/out >> $OUT/export_check.log 2>&1
echo "rc=$?" >> $OUT/export_check.log
ls $W/out >> $OUT/export_check.log 2>&1
