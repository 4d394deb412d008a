# Start every device command with:  source scripts/gpu/unpack.sh;
# Collects the chunks carried so far (scripts/gpu/prepare.sh made them) outside the work tree, and once all have
# arrived and their checksum matches, installs the wheels into $HOME/.hd-site. Then puts the project's source,
# those wheels and the `python`, `hybrid-distill` and `snakemake` commands on the paths, offline.
_hd_stage=$HOME/.hd-stage _hd_site=$HOME/.hd-site _hd_bin=$HOME/.hd-bin
mkdir -p "$_hd_stage" "$_hd_bin"
for _hd_chunk in .gpu/hd-chunk*; do [[ -d $_hd_chunk ]] && cp -n "$_hd_chunk"/* "$_hd_stage"/; done
if [[ ! -f $_hd_site/.ready ]]; then
  _hd_have=$(ls "$_hd_stage"/part.* 2>/dev/null | wc -l)
  _hd_want=$(cat "$_hd_stage/parts.count" 2>/dev/null || echo "?")
  if [[ $_hd_have == "$_hd_want" ]] && \
     [[ $(cat "$_hd_stage"/part.* | sha256sum | cut -d' ' -f1) == $(cat "$_hd_stage/payload.sha256") ]]; then
    mkdir -p "$_hd_stage/payload" && cat "$_hd_stage"/part.* | tar -C "$_hd_stage/payload" -xf -
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$_hd_site" \
      "$_hd_stage"/payload/wheels/*.whl && touch "$_hd_site/.ready" && rm -rf "$_hd_stage/payload"
    echo "unpack: installed $(ls "$_hd_site" | wc -l) packages into $_hd_site"
  else
    echo "unpack: $_hd_have of $_hd_want chunks here; carry the rest"
  fi
fi
printf '#!/bin/sh\nexec python3 "$@"\n' > "$_hd_bin/python"
printf '#!/bin/sh\nexec python3 -m hybrid_distill.cli "$@"\n' > "$_hd_bin/hybrid-distill"
printf '#!/bin/sh\nexec python3 -m snakemake "$@"\n' > "$_hd_bin/snakemake"
chmod +x "$_hd_bin"/*
export PATH=$_hd_bin:$_hd_site/bin:$PATH
export PYTHONPATH=$PWD/src:$_hd_site${PYTHONPATH:+:$PYTHONPATH}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRITON_CACHE_AUTOTUNING=1
[[ -f $_hd_site/.ready ]] && echo "unpack: ready"
true
