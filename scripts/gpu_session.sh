#!/usr/bin/env bash
# The GPU work cards/ still lacks, in stages that each fit one call of the device tool (10 minutes),
# for a session that is lent a device machine (its README: ../.library/device/README.md). Written
# ahead of any such session: no stage has run on a GPU yet, so read the first call's output before
# planning on the rest.
#
# The device image has torch, triton, transformers, peft, safetensors, accelerate, pytest, but not
# bitsandbytes, datasets, pydantic, gguf, galore-torch or apollo-torch: they travel as wheels.
#
#   here:    bash scripts/gpu_session.sh wheels     # .whl/ (git-ignored), ~47 MB, bitsandbytes 43 of them
#   device:  run(command="bash scripts/gpu_session.sh check", carry=[".whl"])
#            run(command="bash scripts/gpu_session.sh ops", carry=[".whl"])
#            ... one stage per call: check ops quant optim sparsity offload
#
# Each stage writes its log and the cards it produced (md + json) under $OUT (at most 8 files come back); copy
# the GPU sections into cards/ here, naming the device, and say in the card what ran where.
set -uo pipefail
stage=${1:-help}
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
case "$stage" in wheels|check|ops|quant|optim|sparsity|offload) ;; *) sed -n '2,16p' "$0"; exit 2 ;; esac

if [ "$stage" = wheels ]; then  # runs here, where PyPI is reachable
    set -e  # .whl/ is in .gitignore: it travels only when a call names it in carry
    plat=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
          --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
          --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
    # the versions this checkout is tested with (pyproject.toml, constraints-cpu.txt)
    $PY -m pip download -q --no-deps "${plat[@]}" -d .whl datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 \
        pydantic==2.14.3 pydantic-core==2.50.4 annotated-types==0.8.0 typing-inspection==0.4.5 gguf==0.19.0 \
        galore-torch==1.0 apollo-torch==1.0.3 bitsandbytes==0.50.2
    du -sh .whl
    exit 0
fi

OUT=${OUT:-/tmp/efft-gpu-out}
mkdir -p "$OUT"
site=/tmp/efft-site
if [ -d .whl ]; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl || exit 1
fi
export PYTHONPATH="$PWD:$site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
dev=$($PY -c "import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')")
log="$OUT/$stage.log"

case "$stage" in
check)  # what the machine has, that efft imports, and the tests that only run with CUDA
    {
        nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
        $PY - <<'EOF'
import importlib
for name in ("torch", "triton", "transformers", "peft", "safetensors", "accelerate", "bitsandbytes", "datasets",
             "pydantic", "galore_torch", "apollo_torch"):
    try:
        m = importlib.import_module(name)
        print(f"{name:14s} {getattr(m, '__version__', '?')}")
    except Exception as e:  # noqa: BLE001 - report every missing piece at once
        print(f"{name:14s} MISSING ({type(e).__name__}: {e})")
import efft  # noqa: F401
print("efft imports")
EOF
        # kernels against the torch reference on real hardware, bnb layouts, CUDA-only tests
        timeout 480 $PY -m pytest -q -p no:cacheprovider -x tests/ops tests/quant -k "cuda or gpu or kernel or triton" 2>&1 | tail -30
    } 2>&1 | tee "$log"
    ;;
ops)  # fused dequantize-matmul and sparse backward vs torch / bitsandbytes: cards/ops.md + ops.json
    timeout 570 $PY scripts/bench_ops.py --out "$OUT/ops.md" 2>&1 | tee "$log"
    ;;
quant)  # quantize/dequantize and Linear timings, GPU rows next to the CPU ones
    timeout 570 $PY scripts/bench_quant.py --machine "$dev" --out "$OUT/quant.md" 2>&1 | tee "$log"
    ;;
optim)  # two LLaMA-7B layers + embeddings: step time and state bytes vs galore-torch / apollo-torch / AdamW
    timeout 570 $PY scripts/bench_optim.py --shapes 7b --bits 32 8 --card "$OUT/optim.md" --json "$OUT/optim.json" \
        --note "$dev" 2>&1 | tee "$log"
    ;;
sparsity)  # CUDA peak next to saved bytes; the papers' settings with --device cuda
    {
        timeout 300 $PY scripts/bench_sparsity.py --no-quality --machine "$dev" --out "$OUT/sparsity-gpu.md"
        timeout 260 $PY scripts/bench_sparsity_papers.py --device cuda --machine "$dev" --out "$OUT/sparsity-papers-gpu.md"
    } 2>&1 | tee "$log"
    ;;
offload)  # optimizer-state / activation / weight offload on a ~1.1B Llama, with the overlap measured
    timeout 570 $PY scripts/bench_offload.py --json "$OUT/offload.json" --card "$OUT/offload.md" 2>&1 | tee "$log"
    ;;
esac
