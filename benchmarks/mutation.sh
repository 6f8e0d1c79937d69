#!/usr/bin/env bash
# Mutation testing of the core (sampling, layer, saving, model, config) and continual/metrics.py
# with mutmut 3 (configured in pyproject.toml [tool.mutmut]). Not part of `make test`: it is CPU-heavy.
#
#   benchmarks/mutation.sh            # run every mutant (results cached in ./mutants/)
#   benchmarks/mutation.sh NAME...    # run only the named mutants (e.g. after adding a test)
#
# Each mutant runs only the tests (of the files listed in [tool.mutmut]) that call the mutated
# function. Runs niced (NICE=15 by default; use NICE=19 while others need the CPU) on MUTMUT_JOBS
# processes with one torch thread each. Summary: `mutmut results`, a mutant's diff: `mutmut show NAME`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
MUTMUT="$(dirname "$PY")/mutmut"
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE TOKENIZERS_PARALLELISM=false
unset PYTHONPATH  # mutmut puts mutants/src first on sys.path itself
start=$(date +%s)
nice -n "${NICE:-15}" "$MUTMUT" run --max-children "${MUTMUT_JOBS:-2}" "$@"
echo "wall time: $(( $(date +%s) - start )) s"
"$MUTMUT" results --all true > mutants/results.txt || true
