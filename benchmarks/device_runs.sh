#!/usr/bin/env bash
# The GPU measurements the open issues wait for, one part per device call (each fits a 10-minute call on one
# H100/H200 with margin; the benchmarks write their JSON as they go, so a part cut at its limit keeps what it
# measured). Run from the repository root on the GPU machine:
#
#   bash benchmarks/device_runs.sh decode-b1      # issue 12: OLMoE-1B-7B shape, batch 1, every variant
#   bash benchmarks/device_runs.sh decode-b16     # issue 12: batch 16
#   bash benchmarks/device_runs.sh decode-qwen3   # issue 12: Qwen3-30B-A3B shape, 12 of its 48 layers
#   bash benchmarks/device_runs.sh gpu-tests      # issues 12, 15: tests/gpu/ (compile + kernels, every rule family)
#   bash benchmarks/device_runs.sh c3po           # issue 15: C3PO cost per surrogate, suffix vs layers recompute
#   bash benchmarks/device_runs.sh arc            # issue 16: full-scale ARC-Challenge (carry .carry/full_scale_arc
#                                                 # and .whl with a faiss-cpu wheel: see full_scale_arc.py --help)
#
# LIMIT=<seconds> caps the part's run (default 560; c3po 400), to fit two parts in one call. For c3po, RECOMPUTE
# (default "suffix suffix-compiled layers") and SURROGATES (default all, comma-separated) choose what is timed;
# for gpu-tests, TESTS (default tests/gpu) the test files or node ids.
# Results land in $OUT (the device tool's folder), else in benchmarks/results/device/.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}." PYTHONUNBUFFERED=1
case "${1:-}" in
decode-b1 | decode-b16 | decode-qwen3 | gpu-tests | c3po | arc) ;;
*)
  sed -n '2,13p' "$0"
  exit 2
  ;;
esac
out="${OUT:-benchmarks/results/device}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$out/gpu.txt" 2>&1 || true
variants="hf_eager_grouped_mm hf_eager_default hf_static_compiled reroute_eager_zero reroute_compiled_zero
  reroute_compiled_offsets reroute_compiled_top4 reroute_compiled_mask rerouter_compiled rerouter_compiled_steps
  scmoe_compiled"

# C3PO (gpu-tests' C3PO case, c3po, arc) needs faiss: carry a faiss-cpu wheel in .whl (see full_scale_arc.py --help)
if ls .whl/faiss_cpu-*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --upgrade --no-index --no-deps --no-compile --target /tmp/site .whl/faiss_cpu-*.whl
  export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi

case "${1:-}" in
decode-b1)
  # shellcheck disable=SC2086
  timeout "${LIMIT:-560}" python3 benchmarks/bench_decode.py --shape olmoe-1b-7b --batches 1 --variants $variants \
    --json "$out/decode_olmoe-1b-7b_b1.json" --profile "$out/decode_profile_olmoe-1b-7b_b1.txt" \
    --profile-variants hf_static_compiled reroute_compiled_zero rerouter_compiled rerouter_compiled_steps scmoe_compiled 2>&1 | tee "$out/decode_b1.log"
  ;;
decode-b16)
  # shellcheck disable=SC2086
  timeout "${LIMIT:-560}" python3 benchmarks/bench_decode.py --shape olmoe-1b-7b --batches 16 --variants $variants \
    --json "$out/decode_olmoe-1b-7b_b16.json" --profile "$out/decode_profile_olmoe-1b-7b_b16.txt" \
    --profile-variants hf_static_compiled reroute_compiled_zero 2>&1 | tee "$out/decode_b16.log"
  ;;
decode-qwen3)
  timeout "${LIMIT:-560}" python3 benchmarks/bench_decode.py --shape qwen3-30b-a3b --layers 12 --batches 1 16 --repeats 2 \
    --state-changes 30 --variants hf_static_compiled reroute_compiled_zero reroute_compiled_offsets \
    rerouter_compiled rerouter_compiled_steps scmoe_compiled --json "$out/decode_qwen3-30b-a3b_12layers.json" 2>&1 | tee "$out/decode_qwen3.log"
  ;;
gpu-tests)
  # shellcheck disable=SC2086
  timeout "${LIMIT:-560}" python3 -m pytest ${TESTS:-tests/gpu} -q -rfE --durations=10 -p no:cacheprovider -o addopts="" 2>&1 | tee "$out/gpu_tests.log"
  ;;
c3po)
  # shellcheck disable=SC2086
  timeout "${LIMIT:-400}" python3 benchmarks/bench_c3po.py --shape olmoe-1b-7b --device cuda --dtype bfloat16 --batch 8 \
    --prompt-tokens 256 --answer-tokens 8 --reference 256 --repeats 2 --recompute ${RECOMPUTE:-suffix suffix-compiled layers} \
    --surrogates "${SURROGATES:-mode,kernel,ngd,oracle,official}" --no-skip-gates \
    --json "$out/c3po_olmoe-1b-7b.json" --profile "$out/c3po_profile.txt" 2>&1 | tee "$out/c3po.log"
  ;;
arc)
  python3 -c "import faiss" || exit 1
  timeout "${LIMIT:-560}" python3 benchmarks/full_scale_arc.py --data .carry/full_scale_arc \
    --out "$out/full_scale_arc.json" 2>&1 | tee "$out/full_scale_arc.log"
  ;;
esac
