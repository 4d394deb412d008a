# Sourced by the scripts/gpu/bench_*.sh scripts: `bench NAME SECONDS ARGS...` runs one `hybrid-distill bench`
# within SECONDS, with the caller's `common` arguments first, writes its JSON to $out/NAME.json, prints the table
# rows and appends the whole log to $out/bench.log as it goes: a device call stopped at its limit keeps what
# finished, and brings back at most 8 files (so at most 7 benches per call).
bench() {
  local name=$1 limit=$2; shift 2
  echo "=== $name: $*"
  timeout "$limit" hybrid-distill bench "${common[@]}" "$@" --out "$out/$name.json" > "$out/current.log" 2>&1
  echo "exit $?"
  grep -E "^(device|options|stage|stage2|--|  ) " "$out/current.log"
  { echo "=== $name: $*"; cat "$out/current.log"; } >> "$out/bench.log"
  rm -f "$out/current.log"
}
