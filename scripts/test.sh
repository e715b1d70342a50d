#!/usr/bin/env bash
# Runs Roundtable's whole test suite on a Debian/Ubuntu machine with Rust.
# Installs what the tests need when it is missing: nats-server (the NATS backend's
# tests start their own on a free port), pytest (the test of `worktest --collect
# pytest`), chromium (the web view's browser test), and node with npm plus the MCP
# reference servers (the MCP tool's tests start them), which go into target/npm at the
# versions pinned below.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v nats-server >/dev/null 2>&1 || [ -x /usr/sbin/nats-server ] || need+=(nats-server)
command -v pytest >/dev/null 2>&1 || need+=(python3-pytest)
command -v chromium >/dev/null 2>&1 || [ -x /usr/bin/chromium ] || need+=(chromium)
command -v node >/dev/null 2>&1 || need+=(nodejs)
command -v npm >/dev/null 2>&1 || need+=(npm)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing test dependencies: ${need[*]}"
  sudo=""
  [ "$(id -u)" -ne 0 ] && sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}"
fi

# The MCP servers the roundtable-tools tests run (keep in step with tests/mcp.rs).
npm_packages=(
  @modelcontextprotocol/server-everything@2026.8.31
  @modelcontextprotocol/server-filesystem@2026.8.31
)
npm_have() {
  local p name version
  for p in "${npm_packages[@]}"; do
    name="${p%@*}"
    version="${p##*@}"
    grep -q "\"version\": \"$version\"" "target/npm/node_modules/$name/package.json" 2>/dev/null || return 1
  done
}
if ! npm_have; then
  echo "installing MCP test servers into target/npm: ${npm_packages[*]}"
  mkdir -p target/npm
  npm install --prefix target/npm --no-audit --no-fund --no-save "${npm_packages[@]}"
fi

cargo test --workspace --locked
