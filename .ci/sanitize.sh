#!/usr/bin/env bash
# Sanitizer job: build mmrprune._cpu with ASan + UBSan in a temporary copy of the
# tree (the normal build is left alone), then run the CPU extension tests and the
# seeded hostile-input fuzz (tests/hostile_fuzz.py) under it.  Any sanitizer
# report fails the job.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
CXX_BIN=${CXX:-g++}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/mmrprune-sanitize.XXXXXX")
[ -n "${MMRPRUNE_SANITIZE_KEEP:-}" ] || trap 'rm -rf "$WORK"' EXIT  # KEEP=1: leave it for a look

# tracked and untracked-but-not-ignored files: what a clean clone plus local edits holds
git ls-files -z --cached --others --exclude-standard | xargs -0 tar cf - | tar xf - -C "$WORK"
cd "$WORK"
export PYTHONPATH="$WORK${PYTHONPATH:+:$PYTHONPATH}"  # tests/hostile_fuzz.py runs as a script
MMRPRUNE_SANITIZE=address,undefined MMRPRUNE_CUDA=0 "$PY" setup.py -q build_ext --inplace >build.log 2>&1 \
  || { cat build.log; exit 1; }

# python3 itself is not built with ASan, so the ASan runtime must be loaded before
# anything else or it refuses to start ("ASan runtime does not come first").
# libstdc++ is preloaded too: python3 does not link it, and without it ASan's
# __cxa_throw interceptor finds no real __cxa_throw and aborts on the first C++
# exception (ours or torch's) with "CHECK failed: asan_interceptors.cpp".
export LD_PRELOAD="$("$CXX_BIN" -print-file-name=libasan.so) $("$CXX_BIN" -print-file-name=libstdc++.so)"
# CPython keeps interned objects and arenas alive until exit on purpose, so
# LeakSanitizer would report them on every run: leaks are not checked.
# Reports go to files, not stderr: pytest captures stderr per test, and a process
# the sanitizer ends takes its captured report with it.
mkdir -p "$WORK/reports"
export ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:exitcode=86:log_path=$WORK/reports/asan"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:exitcode=86:log_path=$WORK/reports/ubsan"
"$PY" -c "import mmrprune, os; assert mmrprune.__file__.startswith(os.getcwd()), mmrprune.__file__"

status=0
"$PY" -m pytest tests/test_cpu_extension.py tests/test_fuzz.py -q -p no:cacheprovider -x 2>&1 | tee pytest.log \
  || status=1
"$PY" tests/hostile_fuzz.py --seed 17 --cases "${MMRPRUNE_FUZZ_CASES:-400}" 2>&1 | tee fuzz.log || status=1
# any report, from any process (a child one included), fails the job
if [ -n "$(ls -A reports)" ]; then
  for f in reports/*; do echo "== $f"; head -n 60 "$f"; done
  echo "sanitize: sanitizer report(s) above"
  status=1
fi
[ "$status" -eq 0 ] && echo "sanitize: clean" || echo "sanitize: FAILED"
exit "$status"
