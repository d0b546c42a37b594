# Shared by the benchmark scripts: a release build, a one-target fleet on
# one Garage, and a timer. Source it; it sets $root, $bin, $work.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ZONEVAULT_GARAGE=$("$root/scripts/install-deps")
export ZONEVAULT_GARAGE
(cd "$root" && cargo build --quiet --release --workspace --locked)
bin=${CARGO_TARGET_DIR:-$root/target}/release

# start_fleet DIR: a fresh fleet (zone ch with one target) in DIR, stopped on exit
start_fleet() {
  work=$1
  [ ! -x "$work/stop.sh" ] || "$work/stop.sh"
  rm -rf "$work"
  "$bin/zv-testkit" fleet "$work" --one-target >/dev/null
  trap '"$work/stop.sh"; rm -rf "$work"' EXIT
}

# measure NAME CMD...: runs CMD under /usr/bin/time (caches dropped first),
# prints "seconds peak-RSS-MB"; the command's output goes to $work/out-NAME.log
measure() {
  local name=$1; shift
  local log=$work/time-$name.log
  sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true
  /usr/bin/time -f '%e %M' -o "$log" "$@" > "$work/out-$name.log" 2>&1 || { cat "$work/out-$name.log"; exit 1; }
  read -r secs rss_kb < "$log"
  echo "$secs $((rss_kb / 1024))"
}

rate() { awk -v mb="$1" -v s="$2" 'BEGIN { printf "%.0f", mb / s }'; }

# restic_env: restic's repository in the fleet's bucket; returns 1 when restic is missing
restic_env() {
  command -v restic >/dev/null 2>&1 || return 1
  local endpoint
  endpoint=$(grep -m1 -A2 'name = "ch-primary"' "$work/zonemap.toml" | sed -n 's/endpoint = "\(.*\)"/\1/p')
  export AWS_ACCESS_KEY_ID=$(cat "$work/secrets/ch-primary.key-id") AWS_SECRET_ACCESS_KEY=$(cat "$work/secrets/ch-primary.secret")
  export RESTIC_REPOSITORY="s3:$endpoint/zv-ch-gva/restic" RESTIC_PASSWORD=bench
  restic -o s3.region=ch-gva-2 init >/dev/null
}

# measure_cpu NAME CMD...: like measure, and prints "seconds peak-RSS-MB cpu-seconds" (user+sys)
measure_cpu() {
  local name=$1; shift
  local log=$work/time-$name.log
  sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true
  /usr/bin/time -f '%e %M %U %S' -o "$log" "$@" > "$work/out-$name.log" 2>&1 || { cat "$work/out-$name.log" >&2; exit 1; }
  read -r secs rss_kb user sys < "$log"
  awk -v s="$secs" -v r="$rss_kb" -v u="$user" -v y="$sys" 'BEGIN { printf "%s %d %.2f\n", s, r / 1024, u + y }'
}

# rustic_bin: the rustic binary (built once into ~/.cache/zonevault/rustic), or nothing
rustic_bin() {
  local b=${RUSTIC:-$HOME/.cache/zonevault/rustic/bin/rustic}
  [ -x "$b" ] && echo "$b" || true
}
