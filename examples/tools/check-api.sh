#!/bin/sh
# Checks an endpoint description the way a contract test would: a method, a path and the
# status codes it promises. Used by the `run_checks` tool of examples/conversation.toml.
# Usage: check-api.sh "POST /users 201 409"
set -u
spec="${1:-}"
fail=0
pass=0
set -- $spec
method="${1:-}"
path="${2:-}"
case "$method" in
  GET|POST|PUT|PATCH|DELETE) echo "ok   method $method"; pass=$((pass + 1)) ;;
  *) echo "FAIL method '$method' is not an HTTP method"; fail=$((fail + 1)) ;;
esac
case "$path" in
  /*) echo "ok   path $path"; pass=$((pass + 1)) ;;
  *) echo "FAIL path '$path' must start with /"; fail=$((fail + 1)) ;;
esac
shift 2 2>/dev/null || shift $#
if [ $# -eq 0 ]; then
  echo "FAIL no status codes promised"; fail=$((fail + 1))
fi
for code in "$@"; do
  case "$code" in
    [1-5][0-9][0-9]) echo "ok   status $code"; pass=$((pass + 1)) ;;
    *) echo "FAIL status '$code' is not an HTTP status"; fail=$((fail + 1)) ;;
  esac
done
echo "$pass passed, $fail failed"
[ "$fail" -eq 0 ]
