#!/usr/bin/env bash
# Build the extension with ASan + UBSan (MODELOPT_C_SANITIZE=1) in a temporary
# copy of the tree, so the normal in-place build is untouched, and run
# the codec, core and format tests against it.  Exits non-zero on any test failure or
# sanitizer report (ASan aborts; UBSan is built with -fno-sanitize-recover).
#
#   .ci/sanitize.sh [extra pytest args]
#   SANITIZE_KEEP=1 .ci/sanitize.sh     # keep the temporary tree for debugging
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d "${TMPDIR:-/tmp}/modelopt_c-sanitize.XXXXXX")"
if [ -z "${SANITIZE_KEEP:-}" ]; then trap 'rm -rf "$work"' EXIT; else echo "tree kept in $work"; fi

# the tracked and untracked-but-not-ignored files: sources, tests, corpus (no build output)
(cd "$repo" && git ls-files -z --cached --others --exclude-standard) |
    (cd "$repo" && xargs -0 cp --parents -t "$work" 2>/dev/null || true)
cd "$work"
echo "sanitize.sh: building with ASan+UBSan in $work"
MODELOPT_C_SANITIZE=1 python setup.py build_ext --inplace >build.log 2>&1 || { tail -50 build.log; exit 1; }

# libstdc++ is preloaded too: python is not linked against it, and ASan's
# __cxa_throw interceptor aborts ("real___cxa_throw != 0") on the first C++
# exception torch throws unless libstdc++ is loaded before ASan resolves it.
asan_lib="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libstdc++.so)"
# detect_leaks=0: CPython and torch keep memory until exit by design.
# verify_asan_link_order=0: python itself is not linked with ASan, the runtime is preloaded.
# abort_on_error / halt_on_error: any report kills the process -> non-zero exit.
export ASAN_OPTIONS="detect_leaks=0:verify_asan_link_order=0:abort_on_error=1:halt_on_error=1:detect_stack_use_after_return=0:allocator_may_return_null=1:handle_segv=1"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
export PYTHONMALLOC=malloc          # let ASan see Python object allocations too
export MODELOPT_C_SANITIZE=1        # tests scale down their loops and skip RSS bounds
export PYTHONPATH="$work${PYTHONPATH:+:$PYTHONPATH}"

# 1. the sanitizer must really be active: a heap overflow through an intercepted memmove
if (LD_PRELOAD="$asan_lib" python -c '
import ctypes
buf = ctypes.create_string_buffer(8)
src = ctypes.create_string_buffer(64)
ctypes.memmove(buf, src, 64)
') >selfcheck.log 2>&1; then
    echo "sanitize.sh: ASan self-check did NOT fire; the sanitizer is not active" >&2
    cat selfcheck.log >&2
    exit 1
fi
grep -q "AddressSanitizer" selfcheck.log || { echo "sanitize.sh: self-check failed for another reason:" >&2; cat selfcheck.log >&2; exit 1; }
nm -D modelopt_c/_conversion*.so >symbols.txt; grep -q __asan_report symbols.txt ||  # no pipe: grep -q + pipefail = SIGPIPE
    { echo "sanitize.sh: extension not instrumented" >&2; exit 1; }
echo "sanitize.sh: ASan self-check fired as expected; running the codec, core and format tests"

# 2. the codec tests, the core's (manager, conversion, checkpoints, restore transaction),
#    the format's (writer incl. the staging pipeline, hostile headers), the CLI's and the
#    damaged files' (test_cli, test_files_and_errors) against the instrumented build,
#    the codec's leak loop (tests/isolated; the others' byte bounds are below ASan's
#    allocator noise at the scaled-down rounds: they run in the normal build), and the
#    hostile corpus (tests/hostile: its children inherit LD_PRELOAD and the options; with
#    MODELOPT_C_SANITIZE=1 they run without an address-space limit, which ASan's
#    terabyte reservations would hit, under a timeout only)
# --capture=sys: pytest must not swallow fd 2, where ASan/UBSan write their report
# right before they abort the process.
LD_PRELOAD="$asan_lib" python -m pytest -q -p no:cacheprovider --capture=sys \
    tests/test_codec.py tests/test_state_manager.py tests/test_conversion.py \
    tests/test_config_and_modes.py tests/test_checkpoint_torch.py \
    tests/test_st_format.py tests/test_checkpoint_safetensors.py \
    tests/test_cli.py tests/test_files_and_errors.py tests/test_torch_zip.py tests/test_torch_zip_write.py tests/test_restore_atomic.py tests/hostile \
    tests/test_progress.py tests/test_notebook_displays.py \
    'tests/test_isolated.py::test_no_leaks[leaks_codec]' --run-isolated "$@" || {
    status=$?
    echo "sanitize.sh: FAILED (exit $status; a sanitizer report, if any, is above)" >&2
    exit "$status"
}

# 3. hostile bytes under the sanitizer: the harness's random mutator over the corpus
fuzz_seconds="${SANITIZE_FUZZ_SECONDS:-30}"
if [ "$fuzz_seconds" -gt 0 ]; then
    echo "sanitize.sh: ${fuzz_seconds}s of mutated corpus inputs under ASan+UBSan"
    mkdir -p fuzz-out
    (cd fuzz-out && LD_PRELOAD="$asan_lib" python ../fuzz/fuzz_codec.py --random "$fuzz_seconds" ../tests/codec_corpus)
fi
echo "sanitize.sh: OK (no sanitizer report)"
