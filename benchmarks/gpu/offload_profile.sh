#!/bin/bash
# One GPU-machine call (2 H200s): issue 12's FSDP CPU-offload probe and issue 13's profiles.
# Writes under $OUT: probe.jsonl (fsdp_offload_probe.py, one line per rank and run),
# profiles.txt (profile_step.py), log.txt. Run from the repository root after installing the
# wheels (PYTHONPATH set). Each step is time-boxed; the deadline skips the 8B timing run.
set -u
OUT=${OUT:?}
M=/tmp/qplan-models
mkdir -p $M
start=$(date +%s)
left() { echo $(( ${DEADLINE:-540} - ($(date +%s) - start) )); }
build() {  # name layers dir
  python3 -c "import sys; sys.path[:0]=['benchmarks']; from pathlib import Path; import memory_grid as g; g.build_model('$1', ${2:-None}, Path('$3'), 'cuda')" >> $OUT/log.txt 2>&1
}
build llama-3.2-1b "" $M/llama1b & build gemma-3-1b "" $M/gemma1b & wait
echo "built $(($(date +%s)-start)) s" >> $OUT/log.txt
# issue 13: the two 1B models at 2048 x 1 with checkpointing, one per GPU at the same time
for spec in "0 gemma-3-1b gemma1b" "1 llama-3.2-1b llama1b"; do
  set -- $spec
  CUDA_VISIBLE_DEVICES=$1 timeout -s KILL 150 python3 benchmarks/profile_step.py --model $M/$3 \
    --name $2 --seq 2048 --batch 1 --out $OUT/prof_$2.txt >> $OUT/log.txt 2>&1 &
done
wait
echo "profiled $(($(date +%s)-start)) s" >> $OUT/log.txt
probe() {  # nproc, then the probe's flags
  local n=$1; shift
  echo "== probe n=$n $* ($(($(date +%s)-start)) s)" >> $OUT/log.txt
  timeout -s KILL 150 torchrun --nproc-per-node $n --master-port 29$((RANDOM % 800 + 100)) \
    benchmarks/fsdp_offload_probe.py --out $OUT/probe.jsonl "$@" >> $OUT/log.txt 2>&1
  echo "rc=$?" >> $OUT/log.txt
}
probe 2 --model $M/llama1b --no-offload --quant-states gpu --steps 4
probe 2 --model $M/llama1b --offload --quant-states gpu --steps 4
probe 2 --model $M/llama1b --offload --quant-states host --steps 3
probe 1 --model $M/llama1b --offload --quant-states gpu --steps 4
rm -rf $M/llama1b $M/gemma1b
if [ $(left) -gt 200 ]; then
  build llama-3.1-8b "" $M/llama8b
  probe 2 --model $M/llama8b --offload --quant-states gpu --steps 4
fi
echo "done $(($(date +%s)-start)) s" >> $OUT/log.txt
