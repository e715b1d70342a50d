#!/usr/bin/env bash
# Regional peers on a NATS JetStream cluster, offline (scripted models):
#
#   1. starts a cluster of three nats-servers (configs generated in a temporary
#      directory: cluster routes, JetStream store directories, distinct ports);
#   2. six regions make their local changes, each its own `roundtable peer` process,
#      each on its own blackboard key, no vote (local.toml), on R3 streams and buckets;
#   3. the six vote on a global change (global.toml); in the middle of the vote the
#      ap-east peer and one NATS server are killed (SIGKILL): the other regions go on
#      and the vote completes among the regions present;
#   4. the server and ap-east come back: ap-east catches up from the log.
#
#   examples/regions/run.sh             # the three-server cluster
#   examples/regions/run.sh --single    # the same against one server (R1)
#
# Needs nats-server (2.9 or newer) on PATH or in /usr/sbin, and the roundtable binary
# (built here with cargo unless ROUNDTABLE names one). PORT_BASE (default 24222) sets
# the ports: clients on PORT_BASE, +1, +2; routes on PORT_BASE+10, +11, +12.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
single=false
case "${1:-}" in
  --single) single=true ;;
  "") ;;
  *) echo "usage: $0 [--single]" >&2; exit 2 ;;
esac

nats_server="$(command -v nats-server || true)"
[ -n "$nats_server" ] || { [ -x /usr/sbin/nats-server ] && nats_server=/usr/sbin/nats-server; }
[ -n "$nats_server" ] || { echo "nats-server not found: apt-get install nats-server (2.9 or newer)" >&2; exit 1; }
if [ -z "${ROUNDTABLE:-}" ]; then
  (cd "$root" && cargo build -q --bin roundtable)
  ROUNDTABLE="$root/target/debug/roundtable"
fi
rt="$ROUNDTABLE"

work="$(mktemp -d "${TMPDIR:-/tmp}/roundtable-regions.XXXXXX")"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

base="${PORT_BASE:-24222}"
if $single; then n=1; replicas=1; else n=3; replicas=3; fi
server_pid=()
start_server() { # index from 1
  local i="$1"
  "$nats_server" -c "$work/n$i.conf" >>"$work/n$i.log" 2>&1 &
  server_pid[$i]=$!
  pids+=("$!")
}
urls=""
for i in $(seq 1 "$n"); do
  port=$((base + i - 1))
  routes=""
  for j in $(seq 1 "$n"); do
    [ "$j" = "$i" ] || routes="${routes:+$routes, }\"nats-route://127.0.0.1:$((base + 9 + j))\""
  done
  {
    echo "server_name: region-nats-$i"
    echo "listen: 127.0.0.1:$port"
    echo "jetstream { store_dir: \"$work/store-$i\" }"
    if ! $single; then
      echo "cluster { name: regions, listen: 127.0.0.1:$((base + 9 + i)), routes: [ $routes ] }"
    fi
  } >"$work/n$i.conf"
  urls="${urls:+$urls,}nats://127.0.0.1:$port"
  start_server "$i"
done
echo "NATS: $n server(s) at $urls (configs in $work), streams and buckets R$replicas"

# Wait until JetStream answers (the cluster has elected its metadata leader).
for _ in $(seq 1 300); do
  if $single && grep -q "Server is ready" "$work/n1.log" 2>/dev/null; then break; fi
  if ! $single && grep -qi "metadata leader" "$work"/n*.log 2>/dev/null; then break; fi
  sleep 0.1
done
sleep 0.5

regions=(us-east us-west eu-west eu-central ap-south ap-east)
peer_pid=()
start_peer() { # team session region
  "$rt" peer "$here/$1" --id "$3" --nats "$urls" --nats-replicas "$replicas" --session "$2" --json \
    --data-dir "$work/data-$3" >"$work/$2-$3.json" 2>"$work/$2-$3.err" &
  peer_pid[$4]=$!
  pids+=("$!")
}
wait_peers() { # session, indexes…
  local s="$1"; shift
  for k in "$@"; do
    if ! wait "${peer_pid[$k]}"; then
      echo "region ${regions[$k]} failed:" >&2; cat "$work/$s-${regions[$k]}.err" >&2
      tail -n 5 "$work"/n*.log >&2; exit 1
    fi
  done
}
field() { # file field
  sed -n "s/.*\"$2\": *\"\\([^\"]*\\)\".*/\\1/p" "$1" | head -1
}

local_s="regions-local-$$"
echo
echo "== Local changes: six regions, each on its own key, no vote (session $local_s)"
for k in "${!regions[@]}"; do start_peer local.toml "$local_s" "${regions[$k]}" "$k"; done
wait_peers "$local_s" 0 1 2 3 4 5
"$rt" log "$local_s" --nats "$urls" | grep -E "board|Stopped" || true

global_s="regions-global-$$"
echo
echo "== Global change: the regions present vote (session $global_s)"
for k in "${!regions[@]}"; do start_peer global.toml "$global_s" "${regions[$k]}" "$k"; done
# In the middle of the vote: once the proposal is on the log, kill ap-east (its vote is
# still being written) and one NATS server.
for _ in $(seq 1 600); do
  if "$rt" export "$global_s" --nats "$urls" 2>/dev/null | grep -q '"kind":"proposal"'; then break; fi
  sleep 0.05
done
kill -9 "${peer_pid[5]}"
echo "killed region ap-east (SIGKILL) during the vote"
if ! $single; then
  kill -9 "${server_pid[2]}"
  echo "killed NATS server 2 (SIGKILL)"
fi
wait_peers "$global_s" 0 1 2 3 4
echo "the five regions present finished: $(field "$work/$global_s-us-east.json" stop_reason)"

if ! $single; then
  start_server 2
  echo "restarted NATS server 2"
fi
start_peer global.toml "$global_s" ap-east 5
wait_peers "$global_s" 5
echo "ap-east is back and caught up from the log: it read $(sed -n 's/.*"envelopes": *\([0-9]*\).*/\1/p' "$work/$global_s-ap-east.json" | head -1) envelopes"
echo "  the change it finds adopted: $(field "$work/$global_s-ap-east.json" final_answer)"
echo
"$rt" log "$global_s" --nats "$urls"
