#!/usr/bin/env bash
# Stage everything the lent GPU machine lacks for a whole workflow run (kernels, the SmolLM2 teacher, Snakemake,
# lm-eval and their needs; see device_wheels.txt) as carry-sized chunks under .gpu/ (git-ignored).
# Run it here, in the project root; then carry the chunks in back-to-back device calls that each start with
#   source scripts/gpu/unpack.sh;
# Usage: bash scripts/gpu/prepare.sh [--kernels] [python version of the GPU machine, default 3.12]
#   --kernels  only the wheels device_wheels.txt marks `# kernels` (fla, tilelang, the CLI's jsonschema and
#              submitit): two chunks, not five, for a lease of benches and GPU tests
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
only_kernels=false; [[ ${1:-} == --kernels ]] && { only_kernels=true; shift; }
python_version=${1:-3.12}
chunk_bytes=58000000              # a device call carries 64 MiB with the work tree
build=.gpu/build
rm -rf "$build" .gpu/hd-chunk*
mkdir -p "$build/payload/wheels"

platforms=(--only-binary=:all: --implementation cp --python-version "$python_version" --platform manylinux2014_x86_64)
for glibc in 17 24 27 28 31 34 35; do platforms+=(--platform "manylinux_2_${glibc}_x86_64"); done
grep -v '^\s*#' scripts/gpu/device_wheels.txt | grep . | { if $only_kernels; then grep '# kernels$'; else cat; fi; } \
  > "$build/requirements.txt"
python3 -m pip download -q --no-deps "${platforms[@]}" -d "$build/payload/wheels" -r "$build/requirements.txt" \
  2> >(grep -v "is ignored" >&2)

tar -C "$build/payload" -cf "$build/payload.tar" .
split -b "$chunk_bytes" -d -a 2 "$build/payload.tar" "$build/part."
parts=("$build"/part.*)
for index in "${!parts[@]}"; do
  mkdir -p ".gpu/hd-chunk$index" && mv "${parts[$index]}" ".gpu/hd-chunk$index/"
done
sha256sum "$build/payload.tar" | cut -d' ' -f1 > .gpu/hd-chunk0/payload.sha256
echo "${#parts[@]}" > .gpu/hd-chunk0/parts.count
rm -rf "$build"
echo "staged $(ls .gpu/hd-chunk*/part.* | wc -l) chunks ($(du -shc .gpu/hd-chunk* | tail -1 | cut -f1)). Make these device calls back to back:"
for ((index = 0; index < ${#parts[@]}; index++)); do
  echo "  carry [\".gpu/hd-chunk$index\"]  command: source scripts/gpu/unpack.sh; ..."
done
