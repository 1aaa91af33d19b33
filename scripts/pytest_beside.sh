#!/usr/bin/env bash
# The pytest stage of `make test`: two pytest runs side by side, so both cores stay busy.
#
# The main run holds everything that uses the local cluster (the e2e, serving-loop and fault
# suites): one control plane per run, and those tests spend much of their time waiting on it. The
# run beside it holds tests that need no cluster but long stretches of CPU or a server's start: the
# learning tests (marked `learning`: one CPU thread each, seeded, minutes of compute) and the
# serving suites outside the cluster (`vllm` and not `e2e`: one vLLM and one real-model trainer
# shared by the hand-off, gateway chat and prefix-cache tests). Their outcomes do not depend on the
# machine's speed (seeded, deterministic, ordered by what the servers answer), so running them
# beside the rest changes nothing but time. Every test runs in exactly one of the two (BESIDE and
# its negation). The side run's output is printed after the main run's; the stage fails if either
# fails. Arguments after PYTHON (test paths, options) go to both runs.
#
# Both runs (and every trainer and pod they start) wait for a core with OMP_WAIT_POLICY=PASSIVE:
# OpenMP's default spin-wait made a two-thread trainer beside the one-thread learning run 20x slower
# (tests/local/test_goals.py: 198.8 s against 10.1 s with a busy one-thread torch process beside it).
#
#   pytest_beside.sh PYTHON [PYTEST ARGS...]
set -uo pipefail

py=$1
shift
export OMP_WAIT_POLICY=PASSIVE
BESIDE="learning or (vllm and not e2e)"
log=$(mktemp -t lorafleet-beside.XXXXXX.log)
temp=$(mktemp -d -t lorafleet-beside.XXXXXX)  # its own temporary directories, apart from the main run's
start=$(date +%s)
"$py" -m pytest -m "$BESIDE" -p no:cacheprovider --basetemp="$temp" "$@" >"$log" 2>&1 &
beside=$!
"$py" -m pytest -m "not ($BESIDE)" "$@"
main_rc=$?
main_s=$(($(date +%s) - start))
wait "$beside"
beside_rc=$?
# Exit 5: no test of the given paths is the side run's (only when paths are given).
if [[ $beside_rc == 5 && $# -gt 0 ]]; then beside_rc=0; fi
echo "== the tests run beside the main pytest (-m \"$BESIDE\"; their output):"
cat "$log"
rm -rf "$log" "$temp"
printf '== pytest: main run %dm%02ds (exit %d); the run beside it ended %dm%02ds after the start (exit %d)\n' \
    $((main_s / 60)) $((main_s % 60)) "$main_rc" \
    $((($(date +%s) - start) / 60)) $((($(date +%s) - start) % 60)) "$beside_rc"
[[ $main_rc == 0 && $beside_rc == 0 ]]
