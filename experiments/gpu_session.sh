#!/usr/bin/env bash
# One lent GPU machine, one prepared command (the device tool's `run`): the test suite, the teacher-cache
# accuracy grid (docs/TEACHER-CACHE.md) and the students `ekdc plan` chose (docs/PLAN.md), side by side.
#
# Before it, on the machine with the data:
#   python experiments/copy_split.py recipes/cifar10-limited.yaml data/cifar10-5k   # the exact split, 40 MB
#   python experiments/plan_budgets.py --out runs/plan                               # planned-<budget>.yaml
#   wheels of what the GPU image lacks in .whl/ (pydantic and its needs, typer)
# then run it with carry [.whl, data/cifar10-5k, runs/plan]; what it leaves in $OUT comes back.
set -u
OUT=${OUT:-/tmp/gpu-out}
LIMIT=${LIMIT:-540}   # seconds this script may take in all
mkdir -p "$OUT/docs"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 3
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
nvidia-smi -L
python3 -c "import torch, pydantic, typer; print('torch', torch.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')" || exit 3
DATA=(--set "data.root=$PWD/data/cifar10-5k/train" --set "data.val_root=$PWD/data/cifar10-5k/val")

# 1. the test suite, with a GPU present
(timeout $((LIMIT - 30)) env OMP_NUM_THREADS=4 python3 -m pytest -q -p no:cacheprovider tests >"$OUT/pytest.log" 2>&1
 echo "pytest exit $?" >>"$OUT/pytest.log") &
TESTS=$!

# 2. the cache grid: live teachers against caches of 4, 10 and 30 views, ekd and avg_kd, 3 seeds
MODES=avg_kd,ekd,avg_kd_k4,avg_kd_k10,avg_kd_k30,ekd_k4,ekd_k10,ekd_k30
(OMP_NUM_THREADS=1 timeout $((LIMIT - 25)) python3 experiments/limited_data_study.py --sizes 5000 --modes $MODES \
   --seeds 0,1,2 --jobs 10 --page TEACHER-CACHE.md --docs "$OUT/docs" --runs-root runs/gpu "${DATA[@]}" \
   >"$OUT/study.log" 2>&1) &
STUDY=$!

# 3. the planned students, once the grid's first cell has saved the teachers
TD=$PWD/runs/gpu/n5000/avg_kd-s0/teachers
while [ ! -f "$TD/resnet18.pt" ] && kill -0 $STUDY 2>/dev/null && [ $SECONDS -lt $LIMIT ]; do sleep 2; done
mkdir -p runs/gpu-plan
for f in runs/plan/planned-*.yaml; do
  [ -f "$f" ] && [ -f "$TD/resnet18.pt" ] || continue
  b=$(basename "$f" .yaml)
  (OMP_NUM_THREADS=1 timeout $((LIMIT - 20 - SECONDS)) python3 -m ekdc distill "$f" --out "runs/gpu-plan/$b" -q "${DATA[@]}" \
     --set "teachers.0.checkpoint=$TD/resnet56.pt" --set "teachers.1.checkpoint=$TD/wrn_16_2.pt" \
     --set "teachers.2.checkpoint=$TD/resnet18.pt" >"runs/gpu-plan/$b.log" 2>&1) &
done
wait $STUDY
wait
tar czf "$OUT/results.tgz" runs/gpu/study.log runs/gpu/n5000/*/metrics.json runs/gpu/n5000/*/log.jsonl \
  runs/gpu/n5000/*/export/manifest.json runs/gpu-plan 2>/dev/null
echo "done in $SECONDS s"
