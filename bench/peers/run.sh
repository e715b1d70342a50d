#!/usr/bin/env bash
# The group-chat workload (BENCHMARKS.md, workload 1) on Roundtable, AutoGen and
# LangGraph, side by side in one run: each repetition runs every framework once per
# message count, interleaved, each in a process of its own; the table gives medians.
#
#   bench/peers/run.sh [--repeat R] [--peers N] [--messages M1,M2]
#
# Defaults: R = 3, N = 16, M = 1000,5000. Creates a virtual environment (bench/peers/.venv,
# or $VENV) with the pinned versions in requirements.txt, builds the release binary
# (or uses $ROUNDTABLE), and writes every run's JSON line to $OUT (default
# bench/peers/results.jsonl, overwritten) before printing the table.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
repeat=3
peers=16
messages=1000,5000
while [ $# -gt 0 ]; do
  case "$1" in
    --repeat) repeat=$2; shift 2 ;;
    --peers) peers=$2; shift 2 ;;
    --messages) messages=$2; shift 2 ;;
    *) echo "usage: $0 [--repeat R] [--peers N] [--messages M1,M2]  (unknown: $1)" >&2; exit 2 ;;
  esac
done

venv=${VENV:-$here/.venv}
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv" || { echo "python3 with the venv module is needed (Debian: apt-get install python3-venv)" >&2; exit 1; }
fi
"$venv/bin/pip" install -q -r "$here/requirements.txt"

if [ -z "${ROUNDTABLE:-}" ]; then
  (cd "$root" && cargo build --release -q -p roundtable-cli)
  ROUNDTABLE=$root/target/release/roundtable
fi

out=${OUT:-$here/results.jsonl}
: > "$out"
IFS=, read -ra sizes <<< "$messages"
for r in $(seq 1 "$repeat"); do
  for m in "${sizes[@]}"; do
    echo "run $r/$repeat, $m messages" >&2
    for persist in off on; do
      "$ROUNDTABLE" bench groupchat --peers "$peers" --messages "$m" --persist "$persist" --json >> "$out"
    done
    (cd "$here" && "$venv/bin/python" autogen_groupchat.py --peers "$peers" --messages "$m") >> "$out"
    (cd "$here" && "$venv/bin/python" langgraph_groupchat.py --peers "$peers" --messages "$m") >> "$out"
  done
done
python3 "$here/table.py" "$out"
