#!/usr/bin/env bash
# The wall time of each stage of `make test` (set-up, vLLM, images, lint, pytest, node run), so
# every note can say what a change cost and where CI's budget goes. Each stage prints its time as
# it ends; the table of all of them is printed at the end, and also when a stage fails.
#
#   stage_times.sh FILE start              forget the times of an earlier run
#   stage_times.sh FILE run NAME CMD...    run CMD, record NAME's seconds and exit status
#   stage_times.sh FILE summary            print the table
set -uo pipefail

file=$1
action=$2
shift 2

minutes() { printf '%dm%02ds' $(($1 / 60)) $(($1 % 60)); }

summary() {
    local name seconds rc total=0
    echo "== make test: stage times"
    while IFS=$'\t' read -r name seconds rc; do
        printf '   %-10s %9s%s\n' "$name" "$(minutes "$seconds")" "$([[ $rc == 0 ]] || echo "  (failed: exit $rc)")"
        total=$((total + seconds))
    done <"$file"
    printf '   %-10s %9s\n' total "$(minutes "$total")"
}

case $action in
start)
    mkdir -p "$(dirname "$file")"
    : >"$file"
    ;;
run)
    name=$1
    shift
    echo "== stage $name: $*"
    started=$(date +%s)
    "$@"
    rc=$?
    seconds=$(($(date +%s) - started))
    printf '%s\t%s\t%s\n' "$name" "$seconds" "$rc" >>"$file"
    echo "== stage $name: $(minutes "$seconds")$([[ $rc == 0 ]] || echo " (failed: exit $rc)")"
    if [[ $rc != 0 ]]; then
        summary
        exit "$rc"
    fi
    ;;
summary)
    summary
    ;;
*)
    echo "usage: $0 FILE start | run NAME CMD... | summary" >&2
    exit 2
    ;;
esac
