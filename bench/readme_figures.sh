#!/usr/bin/env bash
# The README's benchmark figures, in one command, on a quiet machine (from the repository root):
#
#     bash bench/readme_figures.sh [OUT_DIR]        # default OUT_DIR: bench-results/
#
# Three `resnet-fused bench` runs, each interleaved in one process on a fixed thread count (2, the
# machine's cores; override with THREADS=N), tables on stdout, JSON records and PNG charts in OUT_DIR:
#   1. the default run (resnet18, batch 8, 112x112, train and infer): the README's main table;
#   2. and 3. issue 4: ResNet-50 inference at 224x224, batch 1 and batch 8, with torch.compile
#      (freezing, channels_last copy) as the peer: the folded model's target is >= 1.0x of it.
# Markdown tables of all three: OUT_DIR/README-tables.md (bench/records_to_markdown.py).
# Uses `python -m resnet_fused` so the checkout's package runs (set PYTHON to choose the
# interpreter). About 10 minutes on an idle 2-core CPU, most of it compiling ResNet-50 twice.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-bench-results}
THREADS=${THREADS:-2}
PYTHON=${PYTHON:-python}
mkdir -p "$OUT"
run() {
    local name=$1; shift
    echo "\$ resnet-fused bench $* --threads $THREADS"
    "$PYTHON" -m resnet_fused bench "$@" --threads "$THREADS" \
        --json "$OUT/$name.json" --plot "$OUT/$name.png" | tee "$OUT/$name.txt"
}
run default
run resnet50-infer-b1 --model resnet50 --mode infer --size 224 --batch 1 --rounds 20 --compile
run resnet50-infer-b8 --model resnet50 --mode infer --size 224 --batch 8 --rounds 10 --compile
"$PYTHON" bench/records_to_markdown.py "$OUT"/default.json "$OUT"/resnet50-infer-b1.json \
    "$OUT"/resnet50-infer-b8.json > "$OUT/README-tables.md"
echo "markdown tables for the README: $OUT/README-tables.md"
