#!/bin/sh
# cnsprcy example handler, tag url/open: opens an http or https URL in this device's browser.
#
#   cnspr send --to laptop url/open "https://example.org/article"
#
# Install: see "Example handlers" in docs/event_handlers.md (copy, do not link).
# Needs xdg-open (Debian: xdg-utils). Only http:// and https:// URLs are opened: anything else
# (file:, javascript:, a local path, an option) is refused, so a message cannot make this device
# open a file or run a program.
set -eu

max_bytes=4096

# The command substitution drops trailing newlines; what is left must be one URL.
url=$(head -c "$((max_bytes + 1))")
if [ "${#url}" -gt "$max_bytes" ]; then
    echo "refused: longer than $max_bytes bytes"
    exit 1
fi
case "$url" in
    http://?* | https://?* | HTTP://?* | HTTPS://?*) ;;
    *) echo "refused: only http:// and https:// URLs are opened, not \"$url\""; exit 1 ;;
esac
case "$url" in
    *[[:space:][:cntrl:]]*) echo "refused: a URL is one line without spaces or control characters"; exit 1 ;;
esac
if ! command -v xdg-open >/dev/null 2>&1; then
    echo "xdg-open is not installed on $CNSPRCY_DEVICE (Debian: apt install xdg-utils)"
    exit 1
fi
# xdg-open may stay until the browser it started exits: run it in the background, with its
# output redirected, so the handler ends now and the browser is not killed at the time-out.
xdg-open "$url" >/dev/null 2>&1 &
echo "opening $url on $CNSPRCY_DEVICE"
