#!/usr/bin/env bash
# The Python packages skindual needs that a bare GPU image lacks (Ray, diffusers, webdataset, boto3, ...), packed into
# one file for a machine that cannot reach a package index: .gpu-bundle/site.tar.xz (git-ignored), at
# constraints.txt's versions, for CPython 3.12 on x86-64 Linux.  Ray is slimmed to what the
# jobs use (no Java jars, RLlib, Serve, LLM or dashboard source maps, its binaries stripped), so the bundle stays
# under 50 MB: with the repository, under the 64 MiB a lent GPU machine is sent.
# The image's own packages (torch, numpy, pyarrow, pandas, transformers, ...) are used as they are.
#
#   bash bench/gpu_bundle.sh [PYTHON_VERSION]        # default 3.12: the GPU image's python3
# On the GPU machine, from the repository root:
#   mkdir -p /tmp/site && tar -xJf .gpu-bundle/site.tar.xz -C /tmp/site && export PYTHONPATH=/tmp/site:$PWD
set -euo pipefail
cd "$(dirname "$0")/.."
PYV="${1:-3.12}"
PY="${PYTHON:-.venv/bin/python}"
PACKAGES="ray diffusers webdataset braceexpand boto3 botocore s3transfer jmespath clean-fid segmentation-models-pytorch
peft jsonschema jsonschema-specifications referencing rpds-py pydantic pydantic_core annotated-types typing-inspection
tensorboardX typing_extensions importlib_metadata"
pins=()
for name in $PACKAGES; do
    pin=$(grep -i "^${name}==" constraints.txt) || { echo "constraints.txt pins no $name" >&2; exit 1; }
    pins+=("$pin")
done
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYV" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$work/wheels" "${pins[@]}"
"$PY" - "$work" <<'PYEOF'
import os, sys, zipfile
from pathlib import Path
work = Path(sys.argv[1])
for wheel in sorted((work / "wheels").glob("*.whl")):  # a wheel is a zip of what goes into site-packages
    with zipfile.ZipFile(wheel) as archive:
        for member in archive.infolist():
            path = archive.extract(member, work / "site")
            if member.external_attr >> 16:  # Ray's raylet and gcs_server must stay executable
                os.chmod(path, (member.external_attr >> 16) & 0o777)
PYEOF
rm -rf "$work"/site/ray/{jars,rllib,serve,llm} "$work"/site/ray/dashboard/client/build/static/js/*.map
find "$work/site" -name __pycache__ -prune -exec rm -rf {} +
if command -v strip > /dev/null; then  # Ray's binaries carry their symbol tables: a third of their size
    strip --strip-unneeded "$work"/site/ray/_raylet.so "$work"/site/ray/core/src/ray/raylet/raylet \
        "$work"/site/ray/core/src/ray/gcs/gcs_server
fi
mkdir -p .gpu-bundle  # git-ignored (.gitignore)
tar -C "$work/site" -cf - . | xz -6 -T0 > .gpu-bundle/site.tar.xz
echo "$(du -h .gpu-bundle/site.tar.xz | cut -f1) .gpu-bundle/site.tar.xz: ${#pins[@]} packages for CPython $PYV"
