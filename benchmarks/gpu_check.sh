#!/usr/bin/env bash
# One command for a machine with one GPU, under 8 minutes, everything in OUT:
#
#   benchmarks/gpu_check.sh [OUT] [--quick] [--total_s=450] [--fashion_mnist_dir=DIR]
#
# (1) the Mean Teacher race at ResNet-50 96x96 against PyTorch, (2) the MFU
# of that sslj step against the device's dense peak (FLOPs from XLA's cost
# analysis), (3) the k-means TFLOP/s, (4) a Fashion-MNIST FixMatch run of as
# many steps as fit in the time left. Each part has its own budget and
# timeout; a failing part is recorded and the others run. OUT (default
# ./gpucheck) gets summary.json, summary.md, bundle.tar.gz (the small files)
# and each part's JSON and log: see benchmarks/gpu_check.py. --quick: the
# same at toy sizes on a CPU, for testing. Exit status 1 if a part failed.
#
# A GPU machine without tensorflow-datasets, ml_collections, dm-pix and the
# Debian Fashion-MNIST package (nor a network to fetch them):
#
# 1. Where pip reaches PyPI and Fashion-MNIST's IDX files are (Debian:
#    apt install dataset-fashion-mnist), in the repository's root:
#
#      benchmarks/gpu_check.sh --prepare [IDX_DIR]
#
#    It fills .gpucheck/ (ignored by git, about 41 MB): wheels/, the
#    packages sslj needs that such a machine lacks, for CPython 3.12 on
#    x86-64 Linux (versions below), and fashion-mnist/, the four
#    *-ubyte.gz files (from IDX_DIR, default /usr/share/datasets/fashion-mnist).
#
# 2. Carry .gpucheck with the working tree (tree + .gpucheck must stay under
#    64 MiB) and run, e.g. with this workplace's device tool:
#
#      run(carry=[".gpucheck"], timeout_s=540, command=
#        'bash benchmarks/gpu_check.sh /tmp/gpucheck; s=$?; cp /tmp/gpucheck/summary.json /tmp/gpucheck/summary.md /tmp/gpucheck/bundle.tar.gz "$OUT"/; exit $s')
#
#    OUT stays outside $OUT (its checkpoints and caches are many files);
#    the three files copied hold every figure and log. On that machine this
#    script installs .gpucheck/wheels into a temporary folder (pip --no-index
#    --no-deps --target) when the packages are missing, and the FixMatch part
#    prepares the data from .gpucheck/fashion-mnist.
set -uo pipefail
started_at=$(date +%s.%N)
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
PY="${PYTHON:-python3}"

# What a GPU machine with JAX, flax, optax, orbax, chex, scikit-learn and
# PyTorch lacks of sslj's dependencies (and of theirs), as tested here.
WHEELS=(tensorflow-datasets==4.9.10 array_record==0.8.6 ml_collections==1.1.0 dm-pix==0.4.5
        tensorboardX==2.6.5 dm-tree==0.1.10 simple-parsing==0.1.9 docstring-parser==0.18.0
        tensorflow-metadata==1.21.0 googleapis-common-protos==1.76.0 termcolor==3.3.0
        toml==0.10.2 immutabledict==4.3.1 importlib_resources==7.1.0)
# Published as a source archive only: built here into a pure-Python wheel.
SOURCE_ONLY=(promise==2.3)
IMPORTS='import tensorflow_datasets, array_record, ml_collections, dm_pix, tensorboardX, promise'

if [ "${1:-}" = --prepare ]; then
  src="${2:-/usr/share/datasets/fashion-mnist}"
  mkdir -p .gpucheck/wheels .gpucheck/fashion-mnist
  platforms=()
  for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 \
           manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
    platforms+=(--platform "$p")
  done
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp "${platforms[@]}" -d .gpucheck/wheels "${WHEELS[@]}" || exit 1
  "$PY" -m pip wheel -q --no-deps -w .gpucheck/wheels "${SOURCE_ONLY[@]}" || exit 1
  for f in train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz \
           t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz; do
    cp "$src/$f" .gpucheck/fashion-mnist/ || exit 1
  done
  du -sh .gpucheck
  exit 0
fi

out=gpucheck
args=()
for a in "$@"; do
  case "$a" in
    --*) args+=("$a") ;;
    *) out="$a" ;;
  esac
done

if ! "$PY" -c "$IMPORTS" 2>/dev/null; then
  if ! ls .gpucheck/wheels/*.whl >/dev/null 2>&1; then
    echo "gpu_check: sslj's packages are missing here and .gpucheck/wheels is empty:" \
         "run benchmarks/gpu_check.sh --prepare where pip works and carry .gpucheck." >&2
    exit 2
  fi
  site="$(mktemp -d)/site"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$site" .gpucheck/wheels/*.whl || { echo "gpu_check: installing" \
      ".gpucheck/wheels failed" >&2; exit 2; }
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
  echo "gpu_check: installed .gpucheck/wheels into $site"
fi
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec "$PY" -m benchmarks.gpu_check --out="$out" --started_at="$started_at" "${args[@]}"
