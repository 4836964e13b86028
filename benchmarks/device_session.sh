#!/usr/bin/env bash
# The one prepared run for a session lent a CUDA GPU (the `device` tool's `run`), about 2 minutes:
#   1. the 2:4 semi_structured export tests (issue 11): tests/test_export.py -k gpu;
#   2. the 2:4 speedup against dense float16 (issue 11's goal: >= 1.3x on a large Linear), eager
#      and from CUDA graphs, the bias added or fused, the MLP and one 8192 x 8192 Linear;
#      2b. benchmarks/two_four_paths.py, the same per layer and per path,
#      and the exported MLP with its bias added or fused into the kernel (SemiStructuredLinear.fuse_bias);
#   3. benchmarks/gpu_check.py: every paradigm's and dynamic method's CUDA path;
#   4. with --throughput only: the GPU throughput benchmark (issue 10's goals), $OUT/gpu_throughput.json.
# The device's Python (3.12, torch preinstalled) lacks pydantic: carry its wheels in .whl,
# downloaded here first (the folder is git-excluded):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
# then: run(command="bash benchmarks/device_session.sh", carry=[".whl"], timeout_s=600).
# Each step is time-boxed and the script goes on after a failure, so one run reports all three.
set -u
OUT=${OUT:-/tmp/pai-device-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "carry .whl (see the header)"; exit 2; }
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,compute_cap,driver_version --format=csv
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(), torch.cuda.get_device_capability())"
# Step times on the H200 (2026-11-30, second session, two runs): the whole run 123-134 s; the GPU
# check about 60 s of it. The throughput benchmark (issue 10, measured in the first session:
# docs/gpu.md) runs only with --throughput, about 4 minutes more.
echo "== 1. 2:4 export tests"
timeout 90 python3 -m pytest -q -p no:cacheprovider tests/test_export.py -k "gpu or semi_structured" 2>&1 | tee "$OUT/export_tests.txt"
echo "== 2. 2:4 speedup: the exported MLP (bias added, bias fused) and one 8192 x 8192 Linear vs dense float16"
timeout 200 python3 benchmarks/speedup.py --cuda-only --batches 1 64 1024 4096 --json "$OUT/speedup_cuda.json" 2>&1 \
  | grep -v "Warning\|return cls" | tee "$OUT/speedup_cuda.txt"
echo "== 2b. where a 2:4 layer's time goes (eager vs CUDA graph, algorithm, operand layout, bias fused or not; the MLP's kernels)"
timeout 120 python3 benchmarks/two_four_paths.py --profile-batch 1024,4096 --json "$OUT/two_four_paths.json" 2>&1 \
  | grep -v "Warning\|return cls" > "$OUT/two_four_paths.txt"
grep -v "^[-= ]*$\|^ *Name \|Self CUDA" "$OUT/two_four_paths.txt" | grep "x  \|refused\|exported MLP" | head -80
echo "== 3. every paradigm's and method's CUDA path (IteRand, MEST, GraNet, ProsPr, LAMP, HRank, ... since the last run)"
timeout 150 python3 benchmarks/gpu_check.py 2>&1 | tee "$OUT/gpu_check.txt"
if [ "${1:-}" = "--throughput" ]; then
  echo "== 4. GPU throughput"
  timeout 300 python3 benchmarks/gpu_throughput.py --warmup 30 --iters 100 --pack-iters 150 \
    --out "$OUT/gpu_throughput.json" 2>&1 | tee "$OUT/gpu_throughput.txt"
fi
echo "== done"
