#!/usr/bin/env bash
# Fuzz the state codec's decoder for ~60 s (FUZZ_SECONDS), seeded from
# tests/codec_corpus.  Exits non-zero on a crash, an unexpected exception, a failed
# round trip or a hang.  Uses atheris (installed if missing); if atheris cannot be
# installed, falls back to the harness's built-in random mutator.
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_TO_RUN="${FUZZ_SECONDS:-60}"

python setup.py build_ext --inplace >/dev/null

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/corpus" "$work/artifacts"
cp tests/codec_corpus/*.bin "$work/corpus/"   # libFuzzer adds to its corpus dir: keep ours clean

if ! python -c "import atheris" 2>/dev/null; then
    pip install --quiet atheris || echo "fuzz.sh: cannot install atheris; using the built-in mutator" >&2
fi

status=0
if python -c "import atheris" 2>/dev/null; then
    python fuzz/fuzz_codec.py "$work/corpus" \
        -max_total_time="$SECONDS_TO_RUN" -timeout=10 -max_len=8192 -rss_limit_mb=4096 \
        -artifact_prefix="$work/artifacts/" -print_final_stats=1 || status=$?
else
    (cd "$work/artifacts" && python "$OLDPWD/fuzz/fuzz_codec.py" --random "$SECONDS_TO_RUN" "$work/corpus") || status=$?
fi

if [ "$status" -ne 0 ] || compgen -G "$work/artifacts/*" >/dev/null; then
    mkdir -p fuzz/crashes
    cp "$work"/artifacts/* fuzz/crashes/ 2>/dev/null || true
    echo "fuzz.sh: FAILED (status $status); reproducers copied to fuzz/crashes/" >&2
    exit "${status/#0/1}"
fi
echo "fuzz.sh: no crash in ${SECONDS_TO_RUN}s"
