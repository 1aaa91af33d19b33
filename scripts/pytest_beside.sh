#!/usr/bin/env bash
# The pytest stage of `make test`: the learning tests (marked `learning`: one CPU thread each,
# seeded, minutes of compute and no waiting) run in a pytest of their own beside the main run,
# whose e2e and serving tests spend much of their time waiting on servers, so the two cores are
# both busy and the stage's wall time falls. Their outcome does not depend on the machine's speed
# (seeded, deterministic on one thread), so running them beside the rest changes nothing but time.
# The learning run's output is printed after the main run's; the stage fails if either fails.
#
# Both runs (and every trainer and pod they start) wait for a core with OMP_WAIT_POLICY=PASSIVE:
# OpenMP's default spin-wait made a two-thread trainer beside the one-thread learning run 20x slower
# (tests/local/test_goals.py: 198.8 s against 10.1 s with a busy one-thread torch process beside it).
#
#   pytest_beside.sh PYTHON
set -uo pipefail

py=$1
export OMP_WAIT_POLICY=PASSIVE
log=$(mktemp -t lorafleet-learning.XXXXXX.log)
temp=$(mktemp -d -t lorafleet-learning.XXXXXX)  # its own temporary directories, apart from the main run's
start=$(date +%s)
"$py" -m pytest -m learning -p no:cacheprovider --basetemp="$temp" >"$log" 2>&1 &
learning=$!
"$py" -m pytest -m "not learning"
main_rc=$?
main_s=$(($(date +%s) - start))
wait "$learning"
learning_rc=$?
echo "== the learning tests (run beside the main pytest; their output):"
cat "$log"
rm -rf "$log" "$temp"
printf '== pytest: main run %dm%02ds (exit %d); learning run ended %dm%02ds after the start (exit %d)\n' \
    $((main_s / 60)) $((main_s % 60)) "$main_rc" \
    $((($(date +%s) - start) / 60)) $((($(date +%s) - start) % 60)) "$learning_rc"
[[ $main_rc == 0 && $learning_rc == 0 ]]
