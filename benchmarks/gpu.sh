#!/usr/bin/env bash
# GPU measurements: the models' memory and speed by batch size (python -m indexer.models.measure), then
# bench_models, an LFW verification on the device, bench_ingest and bench_cluster. Outputs: DIR/gpu.log (all of it),
# DIR/measure.json and the benchmarks' .json/.txt (DIR: --out, default benchmarks/results/gpu). Each step has a
# time limit; the limits add up to 7.5 minutes (sized for an H200; a step that reaches its limit says so).
#
#   bash benchmarks/gpu.sh                          # on a machine with a CUDA GPU
#   bash benchmarks/gpu.sh --device cpu --dry-run   # print the plan; check each script's --help, run measure --smoke
#
# Python packages the machine lacks (the lent H200 has torch but not faiss, lmdb, watchdog or facenet-pytorch) are
# installed from wheels in .whl/ when there are any. The benchmarks also need LFW ($FACEINDEX_DATA, shared/data or
# ../shared/data) and the embedder weights (README "Models"); a step whose needs are missing is skipped with the
# reason, so the measurement that needs only torch and facenet-pytorch still runs. Exit 0 when a step ran and none
# failed.
set -uo pipefail

device=cuda dry=0 out=benchmarks/results/gpu
while [ $# -gt 0 ]; do
  case "$1" in
    --device) device=${2:?--device needs cpu or cuda}; shift 2 ;;
    --dry-run) dry=1; shift ;;
    --out) out=${2:?--out needs a folder}; shift 2 ;;
    -h|--help) sed -n '2,14p' "$0" | cut -c3-; exit 0 ;;
    *) echo "gpu.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
case "$device" in cpu|cuda|cuda:*) ;; *) echo "gpu.sh: --device must be cpu or cuda[:N]" >&2; exit 2 ;; esac
cd "$(dirname "$0")/.." || exit 1
py=${PYTHON:-python3}
[ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ] && py=.venv/bin/python
export PYTHONUNBUFFERED=1
# A CPU run must not pick up a GPU the machine happens to have: every model follows torch.cuda.is_available().
[ "$device" = cpu ] && export CUDA_VISIBLE_DEVICES=""
threads=$(nproc 2>/dev/null || echo 2)
if [ "$dry" = 0 ]; then
  mkdir -p "$out" || exit 1
  exec > >(tee "$out/gpu.log") 2>&1
fi

# ---- what this machine has
if compgen -G ".whl/*.whl" >/dev/null; then
  install="$py -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl"
  if [ "$dry" = 1 ]; then
    echo "would run: $install"
  else
    echo "+ $install"
    $install || { echo "gpu.sh: installing the wheels in .whl/ failed" >&2; exit 1; }
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
fi
if [ -z "${FACEINDEX_DATA:-}" ] && [ -d shared/data/lfw-devtrain ]; then export FACEINDEX_DATA=$PWD/shared/data; fi

missing=$($py - <<'EOF'
import importlib.util
names = ["torch", "facenet_pytorch", "faiss", "lmdb", "msgpack", "watchdog", "sklearn", "scipy", "threadpoolctl",
         "psutil", "tqdm", "click", "PIL"]
print(" ".join(n for n in names if importlib.util.find_spec(n) is None))
EOF
) || { echo "gpu.sh: $py does not run" >&2; exit 1; }
lfw=$($py -c "from benchmarks.lfw_data import data_root; print(data_root() or '')" 2>/dev/null)
echo "python: $py ($($py -c 'import sys; print(sys.version.split()[0])')); threads: $threads; device: $device"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
echo "missing python packages: ${missing:-none}${missing:+ (put their wheels in .whl/)}"
echo "LFW: ${lfw:-not found (set FACEINDEX_DATA or place shared/data beside or inside the checkout)}"

model_needs=""    # why the measurement cannot run ("" when it can)
for m in torch facenet_pytorch; do [[ " $missing " == *" $m "* ]] && model_needs+="$m "; done
model_needs=${model_needs% }
bench_needs=${missing:+packages: $missing}
[ -z "$lfw" ] && bench_needs+="${bench_needs:+; }LFW"
if [ -z "$bench_needs" ] && [ "$dry" = 0 ]; then
  # Resolving the weights may convert them once (README "Models"); a dry run leaves that to the real one.
  weights=$($py -c "from indexer.models import weights; print(weights.resolve('auto').fingerprint)" 2>&1 | tail -1)
  case "$weights" in *:*) echo "embedder weights: $weights" ;; *) bench_needs="embedder weights ($weights)" ;; esac
  # The LFW embedding cache is named by model and precision, not device: one made elsewhere would be reused.
  cached=$($py -c "from indexer.models.weights import cache_dir; print(*cache_dir().glob('bench/*.npz'))" 2>/dev/null)
  [ -n "$cached" ] && echo "note: LFW embeddings will come from the cache ($cached), not from this device;" \
    "remove it (or set FACEINDEX_CACHE to a fresh folder) to embed LFW here"
fi
if [ "$device" != cpu ] && [ "$dry" = 0 ] && [ -z "$model_needs" ] &&
   ! $py -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  echo "gpu.sh: torch sees no CUDA device; run with --device cpu for a CPU run" >&2
  exit 1
fi

# ---- the plan: name, seconds, what is missing ("" = nothing), command
names=() limits=() needs=() commands=()
plan() { names+=("$1"); limits+=("$2"); needs+=("$3"); commands+=("$4"); }
verify="import json; from benchmarks.lfw_data import require_data; from benchmarks.bench_models import verification; \
print(json.dumps(verification(require_data())))"
plan measure 90 "$model_needs" "$py -m indexer.models.measure --device $device --out $out"
plan bench_models 130 "$bench_needs" "$py benchmarks/bench_models.py --out $out"
# bench_models' embedder-speed table moves CPU tensors through the model, so on CUDA it stops there; the LFW
# verification (accuracy with the device's precision) is measured here on its own, from the cached embeddings.
plan lfw_verification 40 "$bench_needs" "$py -c \"$verify\""
plan bench_ingest 90 "$bench_needs" "$py benchmarks/bench_ingest.py --n 500 --out $out"
plan bench_cluster 100 "$bench_needs" "$py benchmarks/bench_cluster.py --threads $threads --out $out"

if [ "$dry" = 1 ]; then
  status=0
  for i in "${!names[@]}"; do
    echo "would run (limit ${limits[$i]} s${needs[$i]:+, skipped here: missing ${needs[$i]}}): ${commands[$i]}"
  done
  for script in benchmarks/bench_models.py benchmarks/bench_ingest.py benchmarks/bench_cluster.py; do
    if [ -n "$missing" ]; then echo "not checked: $script --help (missing packages: $missing)"
    elif $py "$script" --help >/dev/null; then echo "ok: $script --help"
    else echo "FAILED: $script --help"; status=1; fi
  done
  if [ -n "$model_needs" ]; then echo "not checked: measure --smoke (missing $model_needs)"
  elif $py -m indexer.models.measure --device cpu --smoke >/dev/null; then echo "ok: measure --smoke on CPU"
  else echo "FAILED: measure --smoke on CPU"; status=1; fi
  exit $status
fi

failed=0 ran=0 summary=()
for i in "${!names[@]}"; do
  if [ -n "${needs[$i]}" ]; then summary+=("${names[$i]}: skipped, missing ${needs[$i]}"); continue; fi
  echo; echo "+ ${commands[$i]}   (limit ${limits[$i]} s)"
  started=$SECONDS ran=$((ran + 1))
  timeout "${limits[$i]}" bash -c "${commands[$i]}"
  rc=$?
  [ $rc -ne 0 ] && failed=1
  summary+=("${names[$i]}: exit $rc$([ $rc -eq 124 ] && echo ' (time limit)') in $((SECONDS - started)) s")
done
echo; echo "summary ($out):"; printf '  %s\n' "${summary[@]}"
[ $ran -eq 0 ] && { echo "gpu.sh: nothing could run on this machine" >&2; exit 1; }
exit $failed
