#!/usr/bin/env bash
# One GPU, one script: the bare forward pass and the full analysis of the demo and recipe networks
# (fp32/fp16/bf16, contiguous and channels-last, batch 1 to 32, optionally torch.compile), the CT
# series (demo and recipe networks) and one training step per `pleura train` preset, written as one
# Markdown section for docs/benchmarks.md. At most about 8 minutes on one GPU.
#
#   benchmarks/gpu.sh [--device cuda] [--compile] [--out FILE]
#   benchmarks/gpu.sh --device cpu --tiny      # the same steps on the CPU at a tiny size (a test runs it)
#
# It reuses benchmarks/gpu_bench.py (forward sweep, training step), worker_throughput.py (full
# analysis with its stage budget) and ct.py (CT series). A step that fails is reported in the
# section and the script goes on; the exit status is that of the first failed step.
set -u
cd "$(dirname "$0")/.."
DEVICE=cuda TINY=0 COMPILE="" OUT=/dev/stdout
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE="$2"; shift 2 ;;
    --tiny) TINY=1; shift ;;
    --compile) COMPILE="--compile"; shift ;;
    --out) OUT="$2"; shift 2 ;;
    *) echo "benchmarks/gpu.sh: unknown option $1 (use --device DEV, --tiny, --compile, --out FILE)" >&2; exit 2 ;;
  esac
done
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if [ "$TINY" = 1 ]; then  # seconds on a CPU: every step runs, nothing it prints is a figure
  FORWARD=(--batches 1,2 --precisions fp32,bf16 --size 32 --seconds 0)
  FULL=(--images 2 --size 128 --batch-size 2)
  RECIPE=(--classifier cls-cbr-baseline --segmenter seg-unet-resnet18)
  PRECISIONS=(auto)
  CT=(--slices 4 --size 64 --batch-size 2)
  CT_NETWORKS=(demo)
  STEP=(--size 64 --batch 2 --steps 1)
  LIMIT=600
else
  FORWARD=(--batches 1,8,32 --precisions fp32,fp16,bf16 --seconds 1 $COMPILE)
  # The full analysis also with an analysis process pool of the cores but one (at most 8), the
  # setting that keeps a GPU fed (analysis_processes in docs/configuration.md).
  FULL=(--images 32 --size 2048 --batch-size 16 --analysis-processes $(( $(nproc) > 9 ? 8 : $(nproc) - 1 )))
  RECIPE=()
  PRECISIONS=(fp16 bf16)
  CT=(--slices 200 --size 512 --batch-size 16)
  CT_NETWORKS=(demo recipe)
  STEP=(--batch 16 --steps 3)
  LIMIT=150
fi

STATUS=0
failed() {  # failed RC: the step's failure named in the section; the first one is the exit status
  echo "" >>"$OUT"; echo "**failed (exit $1)**: $(tail -n 3 "$ERRORS" | tr '\n' ' ')" >>"$OUT"
  [ $STATUS -eq 0 ] && STATUS=$1
}
tables() {  # tables COMMAND...: a command that prints its own Markdown
  timeout "$LIMIT" "$@" >>"$OUT" 2>"$ERRORS" || failed $?
}
step() {  # step TITLE COMMAND...: a command's plain output under a heading
  local title="$1"; shift
  echo "" >>"$OUT"; echo "#### $title" >>"$OUT"; echo "" >>"$OUT"; echo '```' >>"$OUT"
  timeout "$LIMIT" "$@" >>"$OUT" 2>"$ERRORS"
  local rc=$?
  echo '```' >>"$OUT"
  [ $rc -eq 0 ] || failed $rc
}
ERRORS="$(mktemp)"
trap 'rm -f "$ERRORS"' EXIT

[ "$OUT" = /dev/stdout ] || : >"$OUT"
{
  echo "### GPU script ($DEVICE$([ "$TINY" = 1 ] && echo ", tiny"))"
  echo ""
  echo "Measured $(date -u '+%Y-%m-%d %H:%M') UTC on $(hostname), $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg)," \
       "$([ "$DEVICE" = cpu ] && echo CPU || nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null | head -1)," \
       "with \`benchmarks/gpu.sh --device $DEVICE$([ "$TINY" = 1 ] && echo " --tiny")${COMPILE:+ $COMPILE}\`."
} >>"$OUT"

for network in demo recipe; do
  recipe_args=(); [ "$network" = recipe ] && recipe_args=("${RECIPE[@]}")
  tables "$PYTHON" benchmarks/gpu_bench.py forward --network "$network" --device "$DEVICE" "${recipe_args[@]}" "${FORWARD[@]}"
  for precision in "${PRECISIONS[@]}"; do
    step "Full analysis: $network network, precision $precision" \
      "$PYTHON" benchmarks/worker_throughput.py --network "$network" --device "$DEVICE" --precision "$precision" \
      "${recipe_args[@]}" "${FULL[@]}"
  done
done
for network in "${CT_NETWORKS[@]}"; do
  step "CT series: $network network" "$PYTHON" benchmarks/ct.py --network "$network" --device "$DEVICE" "${CT[@]}"
done
tables "$PYTHON" benchmarks/gpu_bench.py train-step --device "$DEVICE" "${STEP[@]}"
exit $STATUS
