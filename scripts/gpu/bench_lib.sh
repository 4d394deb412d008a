# Sourced by the scripts/gpu/bench_*.sh scripts: `bench NAME SECONDS ARGS...` runs one `hybrid-distill bench`
# within SECONDS, with the caller's `common` arguments first, writes its JSON to $out/NAME.json, prints the table
# rows and appends the whole log to $out/bench.log as it goes: a device call stopped at its limit keeps what
# finished, and brings back at most 8 files (so at most 7 benches per call).
# With HD_REHEARSE=FILE set (any machine, no GPU needed) nothing runs: each command is recorded in FILE for
# `python scripts/gpu/rehearse.py check FILE`, which checks it with the real parsers before a lease spends a call.
rehearsing() {  # rehearsing KIND ARGS...: in a rehearsal, records the command and succeeds; else fails
  [[ -n ${HD_REHEARSE:-} ]] || return 1
  python "$(dirname "${BASH_SOURCE[0]}")/rehearse.py" record "$@" || { echo "rehearse.py record failed" >&2; exit 3; }
}
bench() {
  local name=$1 limit=$2; shift 2
  rehearsing bench "${common[@]}" "$@" --out "$out/$name.json" && return
  echo "=== $name: $*"
  timeout "$limit" hybrid-distill bench "${common[@]}" "$@" --out "$out/$name.json" > "$out/current.log" 2>&1
  echo "exit $?"
  grep -E "^(device|options|stage|stage2|--|  ) " "$out/current.log"
  { echo "=== $name: $*"; cat "$out/current.log"; } >> "$out/bench.log"
  rm -f "$out/current.log"
}
