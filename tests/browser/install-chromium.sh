#!/bin/sh
# Install the browser the UI tests drive (tests/browser/): Debian's chromium, through apt-get.
# Idempotent and quiet: does nothing when a Chromium is already there (on PATH, or at
# $DISTILLERY_CHROMIUM). Where it cannot install (not root, no apt-get, no network), it says so and
# exits 0: the browser tests then skip with that reason, and the rest of the suite runs.
set -u
for name in chromium chromium-browser google-chrome; do
    if command -v "$name" >/dev/null 2>&1; then exit 0; fi
done
if [ -n "${DISTILLERY_CHROMIUM:-}" ] && [ -x "$DISTILLERY_CHROMIUM" ]; then exit 0; fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-chromium: no apt-get here; the browser tests will skip (install Chromium, or set DISTILLERY_CHROMIUM)" >&2
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "install-chromium: not root, cannot apt-get install chromium; the browser tests will skip" >&2
    exit 0
fi
echo "install-chromium: apt-get install chromium (once; for tests/browser/)" >&2
export DEBIAN_FRONTEND=noninteractive
if ! { apt-get update -qq >/dev/null && apt-get install -y -qq chromium >/dev/null; }; then
    echo "install-chromium: apt-get install chromium failed; the browser tests will skip" >&2
fi
exit 0
