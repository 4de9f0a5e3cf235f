#!/usr/bin/env bash
# One GPU, ≤ 10 minutes: a CIFAR-10-sized unlearning step on the real DDPM CIFAR-10 UNet (random
# init, no downloads) against one forward+backward, its peak memory, and a 1-image NLL timing.
# Not run by CI. Arguments go to bench/gpu_check.py; `bench/gpu_check.sh --small --device cpu`
# runs the same script end to end on a CPU with a narrow UNet.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
exec timeout 600 "${PYTHON:-python}" bench/gpu_check.py "$@"
