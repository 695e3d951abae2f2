#!/usr/bin/env bash
# The device checks of the method, from the source tree, with the machine's own PyTorch (nothing installed,
# no network): the device-parametrized tests (their CUDA cases run where torch sees a GPU), then the
# ImageNet-shaped smoke (benchmarks/gpu_smoke.py). At most 8 minutes on one GPU.
#   bash benchmarks/gpu_check.sh                      # on a GPU machine
#   SMOKE_SIZE=tiny bash benchmarks/gpu_check.sh      # anywhere, the smoke at a tiny size (the CPU variant)
# PYTHON picks the interpreter (default: python3). Exit status: 0 when every part passed.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"
SIZE="${SMOKE_SIZE:-full}"
status=0
"$PY" -c "import torch; c = torch.cuda.is_available(); print('torch', torch.__version__, '| CUDA:', torch.cuda.get_device_name(0) if c else 'none')" || exit 1
if "$PY" -c "import pytest" 2>/dev/null; then
  echo "== device tests"
  timeout 240 "$PY" -m pytest -q -p no:cacheprovider \
    "tests/test_quantize_api.py::test_every_step_runs_where_asked_from_cpu_data" \
    "tests/test_quantize_api.py::test_the_callers_random_state_is_left_as_it_was" \
    "tests/test_quantize_api.py::test_calibration_covers_every_batch_by_default" \
    "tests/test_quant.py::test_union_calibration_on_the_model_device" \
    "tests/test_allocate.py::test_shared_errors_and_the_size_only_budget_check" \
    "tests/test_hessian_every_sample.py::test_the_hessian_runs_where_the_model_lives" \
    "tests/test_size_export.py::test_every_parameter_and_buffer_round_trips_on_any_device" || status=1
else
  echo "== device tests: skipped (pytest is not installed here)"
fi
echo "== ImageNet-shaped smoke ($SIZE)"
# 300 s on a GPU; the tiny size gets more where a busy CPU runs it (SMOKE_TIMEOUT overrides both)
limit="${SMOKE_TIMEOUT:-$([ "$SIZE" = tiny ] && echo 1500 || echo 300)}"
timeout "$limit" "$PY" benchmarks/gpu_smoke.py --size "$SIZE"
rc=$?
[ $rc -eq 124 ] && echo "gpu_smoke: stopped after ${limit} s (SMOKE_TIMEOUT)"
[ $rc -ne 0 ] && status=1
echo "== gpu_check: $([ $status -eq 0 ] && echo passed || echo FAILED)"
exit $status
