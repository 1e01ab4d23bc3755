#!/usr/bin/env bash
# Mutation testing of the core (docs/mutation.md): mutmut makes small bugs in the modules a lost
# or duplicated row would come from ([tool.mutmut] in pyproject.toml), runs the tests that cover
# each one, then prints the score per module and writes the surviving mutants to
# mutants/survivors.txt.
#
#   scripts/mutation.sh                         every core module, from scratch (~25 min, 2 cores)
#   scripts/mutation.sh pool/backoff.py ...     only these modules' mutants
#   scripts/mutation.sh --survivors             again only the mutants that survived last time
#                                               (after adding tests; keeps the other verdicts)
#   scripts/mutation.sh --report                the table and list of the last run, running nothing
#
# Needs PostgreSQL, Redis and RabbitMQ on 127.0.0.1 as the tests do; POOL_TEST_REDIS (default
# 127.0.0.1:6379) names the Redis. A missing service fails the run instead of skipping tests, as
# a skipped test would let every mutant it covers survive. MUTATION_JOBS test processes run at
# once (default 2); POOL_MUTATION_TEST_TIMEOUT (default 120) seconds end a test as a timeout.
set -euo pipefail
cd "$(dirname "$0")/.."

[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install --quiet --disable-pip-version-check -e '.[test,mutation]'

export POOL_TEST_REDIS="${POOL_TEST_REDIS:-127.0.0.1:6379}"
export CI=true  # tests fail, not skip, when a service is missing (tests/conftest.py)

mode=fresh
modules=()
for arg in "$@"; do
    case "$arg" in
        --survivors) mode=survivors ;;
        --report) mode=report ;;
        -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
        -*) echo "mutation.sh: unknown option $arg" >&2; exit 2 ;;
        *)
            if ! grep -qF "\"$arg\"" pyproject.toml; then
                echo "mutation.sh: $arg is not in [tool.mutmut] only_mutate in pyproject.toml" >&2
                exit 2
            fi
            modules+=("$arg") ;;
    esac
done

# mutmut names a mutant after its module: pool/store/base.py -> pool.store.base.<function>__mutmut_N
names=()
for module in "${modules[@]}"; do
    dotted="${module%.py}"
    names+=("${dotted//\//.}.*")
done

started=$(date +%s)
case "$mode" in
    fresh)
        # mutmut keeps verdicts in mutants/ and would not rerun a mutant whose code is unchanged
        # even though the tests changed: start over, as a fresh clone would.
        rm -rf mutants
        .venv/bin/mutmut run --max-children "${MUTATION_JOBS:-2}" "${names[@]}"
        ;;
    survivors)
        mapfile -t names < <(.venv/bin/python scripts/mutation_report.py --names "${modules[@]}")
        if [ "${#names[@]}" -eq 0 ]; then
            echo "mutation.sh: no surviving mutants in mutants/ (run scripts/mutation.sh first)" >&2
            exit 2
        fi
        # mutmut forgets the verdicts of the mutants it does not rerun: they are put back.
        saved=$(mktemp -d)
        .venv/bin/python scripts/mutation_keep_verdicts.py save "$saved"
        .venv/bin/mutmut run --max-children "${MUTATION_JOBS:-2}" "${names[@]}"
        .venv/bin/python scripts/mutation_keep_verdicts.py restore "$saved"
        rm -rf "$saved"
        ;;
esac
echo
[ "$mode" = report ] || echo "mutation.sh: mutmut ran for $(( ($(date +%s) - started) / 60 )) min"
.venv/bin/python scripts/mutation_report.py "${modules[@]}"
