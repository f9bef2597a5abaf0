#!/usr/bin/env bash
# The wheels benchmarks/gpu_check.py needs and the GPU image lacks, for one CPython version.
#
#   bash benchmarks/gpu_wheelhouse.sh [DEST]      (DEST default: benchmarks/wheelhouse, git-ignored)
#   bash benchmarks/gpu_wheelhouse.sh --list      (the pinned requirements, one a line; nothing fetched)
#
# Run it on a machine that reaches the package registries; the GPU machine reaches none, so
# gpu_check.py installs from DEST offline (pip install --no-index --no-deps --target ...). DEST
# travels with the working tree, which may carry at most 64 MiB in all: the script fails when the
# wheels exceed WHEELHOUSE_MAX_MIB (48).
#
# The GPU image (Python 3.12, see GPU_IMAGE_PACKAGES in gpu_check.py) has torch, torchvision, timm,
# transformers, huggingface_hub, numpy, pillow, pyyaml, packaging, psutil, py-cpuinfo, msgpack,
# ninja, pytest and pytest-timeout, but none of what is listed here. What launch/train.py
# experiment=quickstart|txt2img_kl8 logger=none imports on local shards, and nothing more (no
# wandb, lpips, s3fs, gcsfs, webdataset): DeepSpeed and its pydantic, Hydra and OmegaConf, and
# open_clip's CLIP BPE tokenizer (the tiny flavour's). Versions are those of the project's venv.
#
# Environment: PYTHON (the interpreter whose pip runs; default python3), PYTHON_VERSION (the
# target, default 3.12), WHEELHOUSE_MAX_MIB (default 48).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
dest=${1:-$here/wheelhouse}
python=${PYTHON:-python3}
python_version=${PYTHON_VERSION:-3.12}
max_mib=${WHEELHOUSE_MAX_MIB:-48}

# Published only as source distributions: built here into pure (py3-none-any) wheels. DeepSpeed
# then compiles its ops just in time on the GPU machine, if a run needs one (ours use torch's
# fused AdamW and no DeepSpeed kernel).
SDIST_ONLY=(
  deepspeed==0.19.8
  antlr4-python3-runtime==4.9.3  # omegaconf's grammar runtime
)
# Published as wheels: fetched for CPython $python_version on manylinux x86-64 (pydantic-core is
# the only binary one).
WHEELS=(
  hjson==3.1.0                # deepspeed
  pydantic==2.14.4            # deepspeed's config models
  pydantic-core==2.50.5
  annotated-types==0.8.0
  typing-inspection==0.4.5
  typing-extensions==4.16.0   # pydantic needs a newer one than torch does
  hydra-core==1.3.8
  omegaconf==2.3.1
  open-clip-torch==3.3.0      # the CLIP BPE tokenizer of the tiny (quickstart) flavour
  ftfy==6.3.1                 # open_clip's tokenizer
  wcwidth==0.9.4              # ftfy
  braceexpand==0.1.7          # ldm_scale.storage: shard patterns
)

if [ "$dest" = "--list" ]; then
  printf '%s\n' "${SDIST_ONLY[@]}" "${WHEELS[@]}"
  exit 0
fi

mkdir -p "$dest"
rm -f "$dest"/*.whl  # one version of each: two would stop the offline install

echo "gpu_wheelhouse: building ${SDIST_ONLY[*]}"
"$python" -m pip wheel --quiet --no-deps --wheel-dir "$dest" "${SDIST_ONLY[@]}"

echo "gpu_wheelhouse: downloading ${#WHEELS[@]} wheels for CPython $python_version"
"$python" -m pip download --quiet --no-deps --only-binary=:all: \
  --python-version "$python_version" --implementation cp \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
  --dest "$dest" "${WHEELS[@]}"

count=$(find "$dest" -maxdepth 1 -name '*.whl' | wc -l)
expected=$(( ${#SDIST_ONLY[@]} + ${#WHEELS[@]} ))
if [ "$count" -ne "$expected" ]; then
  echo "gpu_wheelhouse: $count wheels in $dest, expected $expected" >&2
  exit 1
fi
bytes=$(find "$dest" -maxdepth 1 -name '*.whl' -printf '%s\n' | awk '{s += $1} END {print s}')
mib=$(awk -v b="$bytes" 'BEGIN {printf "%.1f", b / 1048576}')
echo "gpu_wheelhouse: $count wheels, $mib MiB in $dest"
if [ "$bytes" -gt $(( max_mib * 1048576 )) ]; then
  echo "gpu_wheelhouse: $mib MiB exceeds WHEELHOUSE_MAX_MIB=$max_mib (the working tree carries 64 MiB in all)" >&2
  exit 1
fi
