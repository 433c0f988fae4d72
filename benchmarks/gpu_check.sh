#!/usr/bin/env bash
# The GPU check (issue #17): everything cdm claims about CUDA, in one run of at most ~8 minutes on
# one GPU. It prints what it ran on first and a one-line verdict last; commit its output, with
# the device named, in docs/BENCHMARKS.md ("GPU check").
#
#   1. the machine: GPU name, driver, torch and CUDA versions (no CUDA: it says so and stops);
#   2. the test suite, with tests/test_devices.py's CUDA cases (CPU vs CUDA agreement) included;
#   3. a short bf16 training of each Fashion-MNIST preset on the GPU (its img/s from log.jsonl);
#   4. a 64x64 SR stage's training img/s against diffusers' UNet2DModel of matched shape
#      (benchmarks/vs_diffusers.py --device cuda);
#   5. a 2-process DDP training run (torchrun, NCCL), when the machine has two GPUs;
#   6. with HEADLINE_SECONDS=N (default 0: skipped), N seconds of the headline study's missing cells
#      (experiments/headline.py, issue #15) on cuda:0, from a copy of docs/headline/ into
#      $OUT/headline-record/; copy its cells.jsonl back into docs/headline/ and commit it.
#
# A GPU machine often has no network and no Fashion-MNIST: prepare both here first,
#   benchmarks/gpu_check.sh --prepare     # copies the IDX files and the diffusers wheels into .gpu/
# then carry .gpu/ to the GPU machine and run, from the repository root,
#   bash benchmarks/gpu_check.sh          # results under $OUT (default runs/gpu_check)
# PYTHON picks the interpreter (default python3, which must hold a CUDA build of torch).
set -u -o pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
RES=${OUT:-runs/gpu_check}
FMNIST=/usr/share/datasets/fashion-mnist

if [ "${1:-}" = "--prepare" ]; then
    mkdir -p .gpu/fashion-mnist .gpu/whl
    cp "$FMNIST"/*.gz .gpu/fashion-mnist/ || { echo "gpu_check: no Fashion-MNIST at $FMNIST (make data)"; exit 1; }
    for pkg in diffusers importlib_metadata; do
        "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .gpu/whl "$pkg" \
            || { echo "gpu_check: could not download $pkg"; exit 1; }
    done
    du -sh .gpu
    exit 0
fi

mkdir -p "$RES"
PASSED=() FAILED=()
step() { echo; echo "## $1"; }
ok() { if [ "$1" = 0 ]; then PASSED+=("$2"); else FAILED+=("$2 (exit $1)"); fi; }
[ -d .gpu/whl ] && "$PY" -m pip install -q --no-index --no-deps --target /tmp/cdm-site .gpu/whl/*.whl \
    && export PYTHONPATH="/tmp/cdm-site"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

step "machine"
date -u
nvidia-smi -L 2>/dev/null || echo "nvidia-smi: not found"
"$PY" - <<'EOF' || { echo "gpu_check: NO GPU. This run did not use a GPU; nothing below was checked on one."; exit 1; }
import torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, available: {torch.cuda.is_available()}, "
      f"devices: {torch.cuda.device_count()}")
assert torch.cuda.is_available()
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"cuda:{i} {p.name}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs")
EOF
NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count())")

step "test suite (tests/test_devices.py runs its CUDA cases here)"
timeout 300 "$PY" -m pytest -q -p no:cacheprovider -rs tests/ 2>&1 | tail -25
ok $? "test suite"

DATA=""
[ -d .gpu/fashion-mnist ] && DATA=.gpu/fashion-mnist
[ -z "$DATA" ] && [ -d "$FMNIST" ] && DATA=$FMNIST
step "short bf16 training of each preset on cuda:0 (200 steps; data: ${DATA:-none})"
if [ -n "$DATA" ]; then
    for preset in fmnist-base8 fmnist-sr8to32 fmnist-single32; do
        timeout 120 "$PY" -m cdm.cli train "$preset" --out "$RES/train-$preset" --fresh --no-progress \
            --set train.steps=200 --set train.device=cuda --set train.precision=bf16 --set train.sample_every=0 \
            --set train.ckpt_every=200 --set "data.path=$DATA" >"$RES/train-$preset.txt" 2>&1
        rc=$?
        tail -2 "$RES/train-$preset.txt"
        "$PY" - "$RES/train-$preset/log.jsonl" "$preset" <<'EOF'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if '"img_per_s"' in l]
rates = [r["img_per_s"] for r in rows[len(rows) // 2:]]  # the second half: past start-up
print(f"{sys.argv[2]}: {statistics.median(rates):,.0f} img/s (median of the last {len(rates)} log lines), "
      f"loss {rows[-1]['loss']:.4f} at step {rows[-1]['step']}")
EOF
        ok $((rc || $?)) "train $preset"
    done
else
    echo "no Fashion-MNIST here: run benchmarks/gpu_check.sh --prepare where it is, and carry .gpu/"
    FAILED+=("preset trainings (no data)")
fi

step "64x64 SR stage (16->64): training img/s, cdm against diffusers' UNet2DModel, on cuda:0"
if "$PY" -c "import diffusers" 2>/dev/null; then
    timeout 150 "$PY" benchmarks/vs_diffusers.py --device cuda --presets fmnist-sr8to32 --set resolution=64 \
        --set lowres_resolution=16 --set data.resolution=64 --set unet.attention_resolutions=16 \
        --set train.batch_size=64 --steps 10 --repeats 3 --warmup 3 --out "$RES/vs_diffusers_64.json" 2>&1 | tail -22
    ok $? "vs diffusers 64x64"
else
    echo "diffusers is not installed: run benchmarks/gpu_check.sh --prepare and carry .gpu/"
    FAILED+=("vs diffusers (no diffusers)")
fi

step "DDP: 2 processes"
if [ "$NGPU" -ge 2 ] && [ -n "$DATA" ]; then
    timeout 120 "$PY" -m torch.distributed.run --standalone --nproc_per_node=2 -m cdm.cli train fmnist-base8 \
        --out "$RES/ddp" --fresh --no-progress --set train.steps=100 --set train.device=cuda \
        --set train.sample_every=0 --set "data.path=$DATA" 2>&1 | tail -3
    ok $? "DDP 2 GPUs"
else
    echo "skipped: $NGPU GPU(s) here (needs 2, and the data)"
fi

step "headline study cells on cuda:0 (${HEADLINE_SECONDS:-0} s)"
if [ "${HEADLINE_SECONDS:-0}" -gt 0 ] && [ -n "$DATA" ]; then
    mkdir -p "$RES/headline-record" && cp -r docs/headline/. "$RES/headline-record/" 2>/dev/null
    timeout "$HEADLINE_SECONDS" "$PY" experiments/headline.py --out "$RES/headline" --record "$RES/headline-record" \
        --device cuda --data-path "$DATA" 2>&1 | grep -E "cell |error" | tail -40
    echo "cells recorded: $(wc -l < "$RES/headline-record/cells.jsonl" 2>/dev/null || echo 0)"
else
    echo "skipped (HEADLINE_SECONDS=${HEADLINE_SECONDS:-0}, data: ${DATA:-none})"
fi

step "verdict"
GPU=$("$PY" -c "import torch; print(torch.cuda.get_device_name(0))")
echo "ran on GPU: $GPU; passed: ${PASSED[*]:-none}; failed: ${FAILED[*]:-none}"
[ ${#FAILED[@]} = 0 ]
