#!/usr/bin/env bash
# Bounded fuzzing campaign with C coverage feedback, ASan and UBSan (issue 9).
#
# Two libFuzzer harnesses (fuzz/fuzz_native.c, built by fuzz/build_fuzz.sh into a
# temp dir; the in-place build is untouched):
#   codec   the msgpack state decoder (_conversion.decode_state, what loads_state calls)
#   header  the safetensors reader (st_read_header / st_read / st_read(verify=True))
# each for FUZZ_SECONDS (default 60), seeded from fuzz/corpus_<target>, the test
# corpora and fuzz/regressions.  Exits non-zero on any finding: a crash, a
# sanitizer report, an undocumented exception, a timeout (10 s) or an out-of-memory
# (4 GB); the reproducers are copied to fuzz/crashes/.
#
#   .ci/fuzz.sh                  # both harnesses, 60 s each
#   FUZZ_SECONDS=600 .ci/fuzz.sh
#   FUZZ_TARGETS=codec .ci/fuzz.sh
#
# Installs clang + libFuzzer's runtime (apt) when missing, so a fresh Debian works.
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$PWD"
SECONDS_TO_RUN="${FUZZ_SECONDS:-60}"
TARGETS="${FUZZ_TARGETS:-codec header}"

have_libfuzzer() {
    command -v clang >/dev/null 2>&1 && command -v clang++ >/dev/null 2>&1 &&
        echo 'int LLVMFuzzerTestOneInput(const char *d, unsigned long n) { (void)d; (void)n; return 0; }' |
        clang -x c -fsanitize=fuzzer,address,undefined - -o /dev/null 2>/dev/null
}
if ! have_libfuzzer; then
    echo "fuzz.sh: installing clang and libFuzzer's runtime (apt)" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq clang libclang-rt-dev >/dev/null
    have_libfuzzer || { echo "fuzz.sh: clang cannot link -fsanitize=fuzzer after the install" >&2; exit 1; }
fi
command -v pkg-config >/dev/null 2>&1 && pkg-config --exists msgpack ||
    { apt-get update -qq >/dev/null; apt-get install -y -qq libmsgpack-dev pkg-config >/dev/null; }

work="$(mktemp -d "${TMPDIR:-/tmp}/modelopt_c-fuzz.XXXXXX")"
trap 'rm -rf "$work"' EXIT
bash fuzz/build_fuzz.sh "$work/build"

status=0
for target in $TARGETS; do
    case "$target" in
        codec) seeds="fuzz/corpus_codec tests/codec_corpus"; max_len=8192 ;;
        header) seeds="fuzz/corpus_header tests/st_corpus"; max_len=16384 ;;
        *) echo "fuzz.sh: unknown target $target" >&2; exit 2 ;;
    esac
    mkdir -p "$work/corpus_$target" "$work/artifacts_$target"
    seed_dirs=()
    for d in $seeds fuzz/regressions; do seed_dirs+=("$repo/$d"); done
    echo "fuzz.sh: $target for ${SECONDS_TO_RUN}s (ASan+UBSan, coverage from the C extension)"
    # the first corpus dir receives the new inputs: a temp dir, so the tree stays clean
    "$work/build/run_$target" "$work/corpus_$target" "${seed_dirs[@]}" \
        -max_total_time="$SECONDS_TO_RUN" -timeout=10 -rss_limit_mb=4096 -max_len="$max_len" \
        -artifact_prefix="$work/artifacts_$target/" -print_final_stats=1 \
        >"$work/$target.log" 2>&1 || rc=$?
    grep -E "^(stat::|#[0-9]+[[:space:]]+DONE)" "$work/$target.log" || true
    if [ "${rc:-0}" -ne 0 ] || compgen -G "$work/artifacts_$target/*" >/dev/null; then
        tail -60 "$work/$target.log" >&2
        mkdir -p fuzz/crashes
        cp "$work/artifacts_$target"/* fuzz/crashes/ 2>/dev/null || true
        echo "fuzz.sh: $target FAILED (exit ${rc:-0}): a finding; reproducers copied to fuzz/crashes/" \
            "(replay: fuzz/build_fuzz.sh DIR && DIR/run_$target fuzz/crashes/FILE)" >&2
        status=1
    fi
    unset rc
done
[ "$status" -eq 0 ] || exit "$status"
echo "fuzz.sh: no finding in ${SECONDS_TO_RUN}s per harness ($TARGETS)"
