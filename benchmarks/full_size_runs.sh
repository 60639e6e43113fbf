#!/usr/bin/env bash
# The runs behind RESULTS.md's "full size" section (issue 18), on an H200 machine with
# MLX's CUDA backend and this project installed (../shared/device/README.md):
#   bash benchmarks/full_size_runs.sh one   # whole Flash at 2-bit on GPU 0, selftest beside it
#   bash benchmarks/full_size_runs.sh two   # official format over 2 GPUs (mlx.launch, NCCL)
# Each run's lines go to $OUT (or /tmp/full_size) and to stdout.
set -uo pipefail
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
out=${OUT:-/tmp/full_size}
mkdir -p "$out"
here=$(cd "$(dirname "$0")" && pwd)
py=${PYTHON:-python3}
bench="$here/full_size.py"
extra=${EXTRA:-}  # e.g. "--small --experts 8 --layers 4" for a CPU smoke run
quiet() { grep --line-buffered -v '^127.0.0.1 \|UserWarning\|warnings.warn'; }

launch() {  # launch N ARGS...: mlx.launch over NCCL, one process per GPU
  local n=$1
  shift
  "$py" -c 'import sys; from mlx._distributed_utils.launch import main; sys.argv[0] = "mlx.launch"; main()' \
    --backend "${BACKEND:-nccl}" -n "$n" --env NCCL_NVLS_ENABLE=0 \
    --env "LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}" --python "$py" -- "$bench" $extra "$@"
}

case "${1:-}" in
one)
  if [ "${SELFTEST:-1}" = 1 ]; then
    (timeout 400 mlx-arch-plugins doctor --selftest >"$out/selftest.txt" 2>&1; echo "rc=$?" >>"$out/selftest.txt") &
  fi
  CUDA_VISIBLE_DEVICES=0 "$py" "$bench" single $extra --format affine2 --decode-tokens 48 \
    --phases "${PHASES:-decode,server,spec,prefill}" --budget-s "${BUDGET:-480}" 2>&1 | quiet | tee "$out/single_affine2.txt"
  wait
  if [ "${SELFTEST:-1}" = 1 ]; then cat "$out/selftest.txt"; fi  # SELFTEST=0: still exit 0
  ;;
two)
  nccl=$("$py" -c 'import nvidia.nccl as m, os; print(os.path.join(list(m.__path__)[0], "lib"))' 2>/dev/null)
  export LD_LIBRARY_PATH="${nccl:+$nccl:}${LD_LIBRARY_PATH:-}"
  "$py" -c 'import mlx.core as mx; print("nccl available:", mx.distributed.is_available("nccl"))'
  small=${SMALL_LAYERS:-4}
  if [ -n "${REF:-}" ]; then  # the single-process logits of an earlier run of the same build
    cp "$REF" "$out/ref.npy"
  else
    CUDA_VISIBLE_DEVICES=0 "$py" "$bench" logits $extra --format official --layers "$small" \
      --logits-out "$out/ref.npy" 2>&1 | tee "$out/dist.txt"
  fi
  for mode in ${SMALL_MODES-tp pp}; do
    launch 2 dist --format official --mode "$mode" --prefills "" --decode-runs 1 \
      --logits-out "$out/$mode.npy" --layers "$small" 2>&1 | quiet | tee -a "$out/dist.txt"
    "$py" "$bench" compare "$out/ref.npy" "$out/$mode.npy" 2>&1 | tee -a "$out/dist.txt"
  done
  for mode in ${FULL_MODES-tp pp}; do
    launch 2 dist --format official --mode "$mode" --prefills "${PREFILLS:-4096,32768}" \
      2>&1 | quiet | tee -a "$out/dist.txt"
  done
  ;;
*)
  echo "usage: $0 one|two" >&2
  exit 2
  ;;
esac
