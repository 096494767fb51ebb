#!/usr/bin/env bash
# The bundled default model: a small 3:1 hybrid trained with `hybridlm train` on the Python standard
# library source of the interpreter that runs this script. Meant for one GPU (the device tool's H100);
# the token budget is sized from a short probe so that training takes about TRAIN_SECONDS.
#   OUT=/some/dir bash recipes/bundled_model.sh
set -euo pipefail
OUT=${OUT:?set OUT to where the model should go}
TRAIN_SECONDS=${TRAIN_SECONDS:-360}
WORK=${WORK:-/tmp/bundled}
rm -rf "$WORK" && mkdir -p "$WORK/stdlib"
STDLIB=${STDLIB:-$(python3 -c "import sysconfig; print(sysconfig.get_paths()['stdlib'])")}
(cd "$STDLIB" && find . -name '*.py' -not -path '*/site-packages/*' -print0 | tar --null -cf - -T - | tar -xf - -C "$WORK/stdlib")
echo "data: $(find "$WORK/stdlib" -name '*.py' | wc -l) files, $(du -sh "$WORK/stdlib" | cut -f1) from $STDLIB ($(python3 -V))"
MODEL=(--ratio 3 --hidden 256 --layers 8 --heads 4 --kv-heads 2 --head-dim 64 --gdn-heads 4 --gdn-value-heads 4
       --gdn-head-dim 64 --intermediate 640 --vocab 4096 --seq-len 512 --batch-size 32 --grad-accum 4
       --lr 3e-3 --seed 0 --no-progress)
hybridlm train --data "$WORK/stdlib" --out "$WORK/probe" "${MODEL[@]}" --steps 30 --warmup 5 --eval-every 1000 \
  --save-every 1000 2> "$WORK/probe.log" || { cat "$WORK/probe.log"; exit 1; }
RATE=$(python3 -c "import json; print(json.loads(open('$WORK/probe/log.jsonl').readlines()[-1]).get('tokens_per_s', 0))" 2>/dev/null || echo 0)
tail -1 "$WORK/probe.log"
STEPS=$(python3 -c "r=float('$RATE') or 20000; print(max(200, int(r * $TRAIN_SECONDS / (32 * 512))))")
echo "probe: $RATE tok/s -> $STEPS steps of 32 x 512 tokens"
hybridlm train --data "$WORK/stdlib" --out "$WORK/run" "${MODEL[@]}" --steps "$STEPS" --warmup 100 \
  --tokenizer "$WORK/probe/model" \
  --eval-every 200 --save-every 100000 2>&1 | tail -5
# ship in bf16 (A_log and dt_bias stay fp32): a quarter of the fp32 size
python3 - "$WORK/run/model" "$OUT/model" <<'PY'
import shutil, sys
import hybridlm
model = hybridlm.load(sys.argv[1], device="cpu", dtype="bfloat16")
hybridlm.save(model, sys.argv[2])
shutil.copyfile(f"{sys.argv[1]}/MODEL_CARD.md", f"{sys.argv[2]}/MODEL_CARD.md")
PY
tar -czf "$OUT/run_logs.tar.gz" -C "$WORK/run" log.jsonl train_config.json loss.png -C "$WORK" probe.log
ls -la "$OUT/model"
hybridlm generate --model "$OUT/model" "def fibonacci(n):" --max-tokens 64 --temperature 0
