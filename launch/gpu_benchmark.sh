#!/usr/bin/env bash
# The GPU measurements of docs/benchmarks.md in one go, most important first, each under its own
# time limit, so that a lease that ends early still returns the rows measured so far.
#
# On the device machine (no network; grain, clu, ... travel as wheels, ../shared/gpu-wheels):
#   mkdir -p .whl && cp ../shared/gpu-wheels/*.whl .whl/     # here, once (.whl/ is ignored)
#   run(command="bash launch/gpu_benchmark.sh", carry=[".whl"], timeout_s=480)
# Rows go to $OUT/rows.jsonl (one JSON line each), logs to $OUT/log.txt, and a short table to
# stdout last. On a CPU, `TINY=1 OUT=/tmp/out bash launch/gpu_benchmark.sh` runs every stage
# with tiny batches and steps, to check the script before spending device time.
#
# DEADLINE (seconds since start, default 450) is when no further stage starts; each stage is
# also cut off at the deadline.
set -u
OUT=${OUT:?set OUT to the folder for the rows and logs}
DEADLINE=${DEADLINE:-450}
STARTED=$(date +%s)
ROWS=$OUT/rows.jsonl
LOG=$OUT/log.txt
: >"$ROWS"
: >"$LOG"

if [ -d .whl ] && ! python3 -c "import grain" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
python3 -c "import jax; print('jax', jax.__version__, jax.devices())" 2>&1 | tee -a "$LOG"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,clocks.max.sm \
  --format=csv 2>&1 | tee -a "$LOG"

if [ "${TINY:-0}" = 1 ]; then  # CPU check: the same stages, small enough to finish in minutes.
  R64=(--config.batch_size=4) R192=(--config.batch_size=2)
  TIMING=(--repeats=1 --repeat_seconds=0.1 --predict_batch=4 --pipeline_examples=16)
  TRAIN=(--config.batch_size=4 --config.num_train_steps=4 --config.log_every_steps=2
         --config.data.synthetic.num_train=16 --config.data.synthetic.num_test=8
         --config.data.num_eval_examples=8 --config.eval_batch_size=4)
  MAX_BATCH_RESOLUTION=64
else
  R64=() R192=()
  TIMING=(--repeats=3 --repeat_seconds=1)
  # 300 steps of batch 512 on 2,048 scenes rendered at the size r64 sends (160 px; the full set
  # renders at 240, 280k scenes, hours): the step does not depend on the set's size.
  TRAIN=(--config.num_train_steps=300 --config.data.synthetic.num_train=2048
         --config.data.synthetic.num_test=256 --config.data.num_eval_examples=256)
  MAX_BATCH_RESOLUTION=192
fi

stage() {  # stage NAME COMMAND...: run it unless the deadline has passed; its JSON lines to
  # ROWS, all its output to LOG.
  local name=$1 left
  shift
  left=$((DEADLINE - ($(date +%s) - STARTED)))
  if [ "$left" -le 10 ]; then
    echo "== $name: skipped, deadline" | tee -a "$LOG"
    return
  fi
  echo "== $name ($left s left): $*" | tee -a "$LOG"
  local t0=$(date +%s)
  timeout --kill-after=5 "$left" "$@" 2>>"$LOG" | tee -a "$LOG" | grep --line-buffered "^{" \
    >>"$ROWS"
  echo "== $name: exit ${PIPESTATUS[0]} after $(($(date +%s) - t0)) s" | tee -a "$LOG"
}

BENCH=(python3 -m dmjax.benchmark)
stage "r64 step" "${BENCH[@]}" --config=configs/r64.py:schedule=full "${R64[@]}" --what=step \
  --dtypes=bfloat16,float32 --torch_variants=original,best "${TIMING[@]}"
stage "r64 e2e, predict" "${BENCH[@]}" --config=configs/r64.py:schedule=full "${R64[@]}" \
  --what=e2e,predict "${TIMING[@]}"
stage "r192 step, e2e" "${BENCH[@]}" --config=configs/r192.py:schedule=full "${R192[@]}" \
  --what=step,e2e --dtypes=bfloat16,float32 --torch_variants=original,best "${TIMING[@]}"
# The main job itself (no TensorFlow there), 300 steps of the 64 px full schedule; its log says
# images/s every log_every_steps (100).
stage "r64 training" python3 -m dmjax.main --config=configs/r64.py:schedule=full \
  --workdir=/tmp/dmjax_r64_full "${TRAIN[@]}"
grep -h "train.py" "$LOG" >"$OUT/training.txt"
stage "r192 max_batch" "${BENCH[@]}" --config=configs/r192.py:schedule=full "${R192[@]}" \
  --what=max_batch --max_batch_resolution=$MAX_BATCH_RESOLUTION
stage "r64 pipeline" "${BENCH[@]}" --config=configs/r64.py:schedule=full "${R64[@]}" \
  --what=pipeline --pipeline_resolutions=128 --pipeline_workers=0,4 --seconds=5 "${TIMING[@]}"

python3 - "$ROWS" <<'EOF'
import json, sys
print(f"{'what':9} {'config':22} {'runner':34} {'dtype':9} {'img/s':>10} {'peak':>6}  more")
for line in open(sys.argv[1]):
  try:
    row = json.loads(line)
  except ValueError:
    continue
  runner = " ".join(str(row.get(k, "")) for k in ("model", "variant", "resolution", "batch_size"))
  more = " ".join(f"{k}={v}" for k, v in row.items() if k.startswith("ratio_to_") or k in (
      "e2e_over_step", "max_batch", "latency_ms", "mode", "num_workers", "device_peak_memory_mb"))
  rate = row.get("images_per_sec")
  print(f"{row['what']:9} {row.get('config', '').replace('configs/', ''):22} {runner[:34]:34} "
        f"{str(row.get('dtype', ''))[:9]:9} {rate if rate is not None else '-':>10} "
        f"{row.get('fraction_of_peak', '') or '':>6}  {more}")
EOF
cat "$OUT/training.txt"
echo "total $(($(date +%s) - STARTED)) s"
