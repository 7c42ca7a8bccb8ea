#!/bin/bash
# usage: [EMBEDDING=gradients] [QUALITY=toy] [AMG_OPTS="--amg-max-ratio 1"] scripts/measure_amg.sh DATA PIPELINE OUT
# (the AMG measurement of docs/results.md on one world; EMBEDDING: the index embedding, default pixels;
# QUALITY: evaluate's --quality-feature, e.g. toy for the shape world's alignment; AMG_OPTS: guard options)
set -e
D=$1; P=$2; R=$3
MT=${MEMTRAIN:-memtrain}
export OMP_NUM_THREADS=1
mkdir -p $R
python3 - "$D" "$R" <<'PY'
import json, sys
d, r = sys.argv[1], sys.argv[2]
rows = [json.loads(l) for l in open(f"{d}/labels.jsonl") if l.strip()]
dup = [x for x in rows if x["group"] == "duplicated"]
novel = [x for x in rows if x["group"] == "novel"][100:164]
open(f"{r}/prompts.jsonl", "w").write("".join(json.dumps(x) + "\n" for x in dup + novel))
open(f"{r}/trigger.txt", "w").write("".join(x["text"] + "\n" for x in dup))
PY
[ -d $R/index ] || $MT index $D/train --out $R/index --heldout $D/heldout --vae $P --embedding ${EMBEDDING:-pixels} \
    --no-progress > $R/index.json.log
for seed in 0 100; do
  [ -f $R/eval_s$seed/report.json ] || $MT evaluate $P --prompts $R/prompts.jsonl --data $D --train-data $D/train --heldout $D/heldout -n 2 \
      --guidance-scale 3 --detectors noise --index $R/index --guard amg $AMG_OPTS --seed $seed ${QUALITY:+--quality-feature $QUALITY} \
      --out $R/eval_s$seed > $R/eval_s$seed.log 2>&1
done
[ -d $R/gen_none ] || $MT generate $P --prompts $R/trigger.txt --out $R/gen_none -n 1 --guidance-scale 3 > /dev/null 2>&1
[ -d $R/gen_amg ] || $MT generate $P --prompts $R/trigger.txt --out $R/gen_amg -n 1 --guidance-scale 3 --guard amg $AMG_OPTS --index $R/index > $R/gen_amg.log 2>&1
echo done
