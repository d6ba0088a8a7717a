#!/usr/bin/env bash
# Everything a lent GPU should run, as one call of the device tool, in under 8 minutes (200 + 180 + 50 s of
# timeouts and the start-up), which leaves time for one rerun of the tests alone:
#
#   bash bench/gpu_session.sh --fetch-wheels          # here, once: the packages the GPU image lacks, into .whl/
#   run(command="bash bench/gpu_session.sh", carry=[".whl"], timeout_s=480)
#   run(command="bash bench/gpu_session.sh tests", carry=[".whl"], timeout_s=240)   # the tests alone (a retry)
#
# It runs bench/gpu_pretrain.py (125M/350M/1.3B at seq 2048, bf16, compiled vs eager, MFU, peak memory), the
# GPU forms of the tests (tests/gpu: bf16 + compile + resume, async save on a CUDA stream and its GPU memory,
# the KV cache and grouped-query attention, packed documents through flex_attention, the memory plan against
# the allocator; NCCL when two GPUs are there) and bench/packed_attention.py (S = 2048 and 8192, forward and
# backward). Logs and the result JSONs land in $OUT; copy the JSONs into bench/results/ and the figures into
# docs/performance.md.
set -uo pipefail
cd "$(dirname "$0")/.."
WHEELS=(mosaicml-streaming==0.13.0 omegaconf==2.4.0 antlr4-python3-runtime==4.13.2 catalogue==2.0.10
        brotli==1.2.1 python-snappy==0.7.3 cramjam==2.14.0 zstd==1.5.7.3)

if [ "${1:-}" = "--fetch-wheels" ]; then  # the GPU image's Python is 3.12 and has no network
    exclude=$(git rev-parse --git-path info/exclude)
    mkdir -p "$(dirname "$exclude")" .whl
    grep -qx "/.whl/" "$exclude" 2>/dev/null || echo "/.whl/" >>"$exclude"
    exec python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl "${WHEELS[@]}"
fi

OUT=${OUT:-/tmp/orch-gpu-session}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/gpu.txt"
# First, in seconds: does the code import with this machine's torch? A failure here costs no benchmark time.
python3 -c "import training.main, training.trainer, training.muon_shards, model.generate, bench.gpu_pretrain" \
    2>&1 | tee "$OUT/imports.log" || { echo "the code does not import with this torch: see imports.log"; exit 1; }

status=0
PART=${1:-all}  # all | bench | tests
if [ "$PART" != tests ]; then
    # The benchmark first: it is what issue 8 asks for; each size's line is in the log even if time runs out.
    # GPU_PRETRAIN_ARGS: e.g. "--sizes tiny --device cpu --seq 128 --steps 3" to try this script without a GPU.
    timeout 200 python3 -m bench.gpu_pretrain --profile ${GPU_PRETRAIN_ARGS:-} 2>&1 | tee "$OUT/gpu_pretrain.log" || status=1
    cp bench/results/gpu_pretrain-*.json "$OUT/" 2>/dev/null
fi
if [ "$PART" != bench ]; then
    timeout 180 python3 -m pytest -q -p no:cacheprovider tests/gpu 2>&1 | tee "$OUT/tests_gpu.log" || status=1
fi
if [ "$PART" != tests ] && python3 -c "import torch; exit(not torch.cuda.is_available())"; then
    timeout 50 python3 -m bench.packed_attention 2>&1 | tee "$OUT/packed_attention.log" || status=1
    cp bench/results/packed_attention-*.json "$OUT/" 2>/dev/null
fi
exit $status
