#!/usr/bin/env bash
# The media tests on a GPU host: NVENC transcodes (tests/test_media_transcode.py's GPU cases run
# only where nvidia-smi exists), then the rest of the module. Needs Debian's ffmpeg.
# MEDIA_REQUIRE_NVENC=1 makes a GPU without a working NVENC (H100/H200 have none) a failure
# instead of a software fallback that says why.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v nvidia-smi >/dev/null || { echo "no nvidia-smi: not a GPU host" >&2; exit 2; }
command -v ffmpeg >/dev/null || { echo "no ffmpeg: apt-get install -y ffmpeg" >&2; exit 2; }
nvidia-smi --query-gpu=index,name,driver_version --format=csv,noheader
ffmpeg -hide_banner -encoders 2>/dev/null | grep -E "nvenc" || true
PYTEST="${PYTEST:-.venv/bin/pytest}"
"$PYTEST" -q -p no:cacheprovider -rA tests/test_media_transcode.py -k nvenc "$@"
"$PYTEST" -q -p no:cacheprovider tests/test_media_transcode.py "$@"
