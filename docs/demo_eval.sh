#!/usr/bin/env bash
# The evaluation of the demo cascade shown in README.md, after `make demo` (run from the repo root).
# Writes runs/classifier, runs/eval, runs/sweep (each with a report.html) and runs/nll (nll.md).
set -euo pipefail
B=.venv/bin
time $B/cdm train-classifier --out runs/classifier --no-progress
time $B/cdm eval --cascade runs/demo/cascade.json --out runs/eval --n 1000 --classifier runs/classifier \
     --features classifier --cas --sampler dpmpp-2m --steps 25 --spacing quadratic
time $B/cdm sweep --cascade runs/demo/cascade.json --out runs/sweep --classifier runs/classifier \
     --levels 0,50,100,200,300,500 --n 500 --sampler dpmpp-2m --steps 25 --spacing quadratic
time $B/cdm nll --cascade runs/demo/cascade.json --out runs/nll --n 100 --no-progress
