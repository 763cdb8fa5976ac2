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

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy --all-targets -- -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "cargo test"
cargo test --workspace --locked

step "MedTech conformance suite"
if [[ ! -f "$conformance/run.py" ]]; then
  echo "conformance suite not found at $conformance (set IOMT_CONFORMANCE)" >&2
  exit 1
fi
cargo build --locked --bin iomt
python3 "$conformance/run.py" --iomt "$repo/target/debug/iomt"
