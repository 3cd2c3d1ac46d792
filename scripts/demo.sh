#!/usr/bin/env bash
# Set up (idempotent), then optimize the bundled Fashion-MNIST classifier with lowrank under the default
# budget and show the before/after table and the top-1 accuracy on the 10k test set.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
bash scripts/setup.sh
mkdir -p out
calib=models/data/fashion_mnist_calib.npz
[ -f "$calib" ] || .venv/bin/python models/fashion_mnist.py calib "$calib"
.venv/bin/onnxopt optimize models/fashion_mnist.onnx -o out/fashion_mnist.opt.onnx \
  --methods "${METHODS:-lowrank}" --calib "$calib" --report out/fashion_mnist.report.json "$@"
echo
echo "top-1 on the 10k Fashion-MNIST test set:"
echo -n "  original:  "; .venv/bin/python models/fashion_mnist.py eval models/fashion_mnist.onnx
echo -n "  optimized: "; .venv/bin/python models/fashion_mnist.py eval out/fashion_mnist.opt.onnx
