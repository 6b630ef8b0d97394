#!/usr/bin/env bash
# Re-runs every committed evaluation (resumable: finished cells are skipped). About 4 hours on the
# 2-core development machine. Needs `kakeya calibrate` first (the ladder and v2 recipes use it).
# The kakeya-v2 research points are KakeyaConfig field overrides in the grid files (kakeya-<bits>b-...
# names are generated from the config: see kakeyaturbo.recipes.kakeya). Ends by rebuilding
# benchmarks/RESULTS.md from the records (`kakeya report`).
set -euo pipefail
cd "$(dirname "$0")/.."
K=.venv/bin/kakeya
$K calibrate
for r in kakeya-quality kakeya-balanced kakeya-max kakeya-extreme; do
  $K recipes $r --layers --plot benchmarks/results/layer-bits/$r.png --json benchmarks/results/layer-bits/$r.json
done
$K sweep --grid benchmarks/sweeps/ablation-layer-bits-ctx1024.json --out benchmarks/results/ablation-layer-bits \
  --ablation-reference kakeya-3b-head-gain0-refl0-fixed-probe-head
$K sweep --grid benchmarks/sweeps/v2-sensitivity-ctx1024.json --out benchmarks/results/ctx1024
$K sweep --grid benchmarks/sweeps/v2e-ctx1024.json --out benchmarks/results/ctx1024
$K sweep --grid benchmarks/sweeps/v2a-ctx1024.json --out benchmarks/results/ctx1024
$K sweep --grid benchmarks/sweeps/v2j-ctx1024.json --out benchmarks/results/ctx1024
$K sweep --grid benchmarks/sweeps/v2jh-ctx1024.json --out benchmarks/results/ctx1024
$K sweep --grid benchmarks/sweeps/v2jv-ctx1024.json --out benchmarks/results/ctx1024
$K sweep --grid benchmarks/sweeps/v2jo-ctx1024.json --out benchmarks/results/ctx1024
$K sweep --grid benchmarks/sweeps/v2jo4-ctx1024.json --out benchmarks/results/ctx1024
$K sweep --grid benchmarks/sweeps/v2g-ctx1024.json --out benchmarks/results/ctx1024
$K sweep --grid benchmarks/sweeps/ablation-ctx1024.json --out benchmarks/results/ablation \
  --ablation-reference kakeya-3b-head-gain0-refl0-fixed-uniform-sink1
$K sweep --grid benchmarks/sweeps/v2-ctx1024.json --out benchmarks/results/ctx1024
$K sweep --grid benchmarks/sweeps/windows32.json --out benchmarks/results/windows32
$K sweep --grid benchmarks/sweeps/windows32-streaming.json --out benchmarks/results/windows32
$K sweep --grid benchmarks/sweeps/windows32-all.json --out benchmarks/results/windows32 --report-only
$K sweep --grid benchmarks/sweeps/ctx1024.json --out benchmarks/results/ctx1024
$K sweep --grid benchmarks/sweeps/ctx2048.json --out benchmarks/results/ctx2048
$K sweep --grid benchmarks/sweeps/all-ctx1024.json --out benchmarks/results/ctx1024 --report-only
$K diagnose --recipe v1.3-l2-whiten --tokens 256 --json benchmarks/diagnose/v1.3-l2-whiten.json
$K bench --codec all --streams 4 --tokens 2048 --repeats 3 --json benchmarks/codecs.json --markdown benchmarks/codecs.md
$K bench --codec kakeya-v2 --codec turboquant --codec kivi --codec rotated-int --data captured --tokens 2048 --repeats 1 --json benchmarks/codecs-captured.json --markdown benchmarks/codecs-captured.md
$K bench --codec kakeya-v2 --data captured --layout joint --tokens 2048 --repeats 1 --json benchmarks/codecs-captured-joint.json --markdown benchmarks/codecs-captured-joint.md
$K bench --recipe shipped --threads 2 --repeats 15 --json benchmarks/codec-speed.json --markdown benchmarks/codec-speed.md
$K bench --generate --ctx 1024 4096 --steps 16 --repeats 3 --json benchmarks/generate.json --markdown benchmarks/generate.md
.venv/bin/python benchmarks/entropy_coding.py --out benchmarks/entropy  # needs the research extra (constriction)
.venv/bin/python benchmarks/cross_layer.py --out benchmarks/cross-layer
.venv/bin/python benchmarks/cross_layer.py --kl --windows 8 --bits 1.5 2 2.5 --out benchmarks/cross-layer
.venv/bin/python benchmarks/cross_layer.py --kl --windows 8 --groups pair quad --reflector-bits 3 --bits 1.5 2 2.5 --out benchmarks/cross-layer
.venv/bin/python benchmarks/allocation.py --out benchmarks/allocation
$K report --benchmarks benchmarks --out benchmarks/RESULTS.md
