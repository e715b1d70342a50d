#!/bin/sh
# A program peer (see examples/failing-check.toml): on its first turn it checks that the
# fields the frontend sends are the fields the backend expects, and reports a failure
# directly to the two peers it concerns; otherwise it stays quiet (an empty output).
# Input: the peer's inbox as JSON lines on stdin (first line: {"peer", "step", ...}).
# Output: actions as JSON lines on stdout.
set -u
header=$(head -n 1)
cat >/dev/null
# Act once: on the first turn, and not again after its own sends come back.
case "$header" in
  *'"in_turn":true'*) exit 0 ;;
  *'"step":"conv/ci/1"'*) ;;
  *) exit 0 ;;
esac
dir=$(dirname "$0")/contract
sends=$(sed 's/.*"sends": *\[\([^]]*\)\].*/\1/' "$dir/frontend.json" | tr -d ' "' | tr ',' '\n' | sort)
expects=$(sed 's/.*"expects": *\[\([^]]*\)\].*/\1/' "$dir/backend.json" | tr -d ' "' | tr ',' '\n' | sort)
only_front=$(printf '%s\n' "$sends" | grep -vxF "$expects" | tr '\n' ' ' | sed 's/ $//')
only_back=$(printf '%s\n' "$expects" | grep -vxF "$sends" | tr '\n' ' ' | sed 's/ $//')
if [ -z "$only_front$only_back" ]; then
  echo '{"broadcast": "contract check passed: POST /users fields match"}'
  exit 0
fi
msg="contract check failed for POST /users: the frontend sends [$only_front], the backend expects [$only_back]. Agree on one name between you."
echo "{\"send\": {\"to\": \"frontend\", \"text\": \"$msg\"}}"
echo "{\"send\": {\"to\": \"backend\", \"text\": \"$msg\"}}"
