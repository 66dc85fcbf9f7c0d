#!/usr/bin/env bash
# The commands of the composite action (action.yml), one file so that the action, a user's shell and
# tests/test_workflows.py run exactly the same thing. Inputs come as environment variables (never expanded into
# the action's run: lines): LCC_MODEL, LCC_METHODS, LCC_PROFILE, LCC_ENGINE, LCC_DEVICE, LCC_SHARD,
# LCC_UPDATE_BASELINES (true|false), LCC_REPORT_DIR, LCC_BASELINE_DIR. LCC_HARNESS is the harness checkout (the
# action's own path); the suites run in LCC_WORKSPACE (the user's repository: baselines/ and reports/ live there).
#
#   scripts/kl-gate.sh install     make setup in the harness checkout (venv, pinned CPU torch or TORCH_SPEC)
#   scripts/kl-gate.sh run         pytest suites/ with the inputs; exits with pytest's status
#   (the run's pytest appends the report's summary to GITHUB_STEP_SUMMARY itself)
set -euo pipefail
harness="${LCC_HARNESS:-$(cd "$(dirname "$0")/.." && pwd)}"
workspace="${LCC_WORKSPACE:-$PWD}"
report_dir="${LCC_REPORT_DIR:-$workspace/reports}"

case "${1:-}" in
  install)
    make -C "$harness" setup
    ;;
  run)
    args=(--lcc-profile "${LCC_PROFILE:-default}" --lcc-engine "${LCC_ENGINE:-torch}"
          --lcc-device "${LCC_DEVICE:-auto}" --lcc-report-dir "$report_dir"
          --lcc-baseline-dir "${LCC_BASELINE_DIR:-$workspace/baselines}" -p no:cacheprovider)
    [ -n "${LCC_MODEL:-}" ] && args+=(--lcc-model "$LCC_MODEL")
    [ -n "${LCC_METHODS:-}" ] && args+=(--lcc-methods "$LCC_METHODS")
    [ -n "${LCC_SHARD:-}" ] && args+=(--lcc-shard "$LCC_SHARD")
    case "${LCC_UPDATE_BASELINES:-false}" in
      true) args+=(--lcc-update-baselines) ;;
      false) ;;
      *) echo "kl-gate: update-baselines must be true or false, not '$LCC_UPDATE_BASELINES'" >&2; exit 2 ;;
    esac
    cd "$workspace"
    # the user's pytest configuration (lcc_method_tolerance, lcc_compressed, …) when the repository has one
    for ini in pytest.ini pyproject.toml tox.ini setup.cfg; do
      if [ -f "$workspace/$ini" ]; then args+=(-c "$workspace/$ini"); break; fi
    done
    exec "$harness/.venv/bin/pytest" "$harness/suites" --rootdir "$workspace" "${args[@]}"
    ;;
  *)
    echo "usage: scripts/kl-gate.sh install|run" >&2
    exit 2
    ;;
esac
