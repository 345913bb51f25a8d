#!/bin/sh
# cnsprcy example handler, tag clipboard/set: puts the payload on this device's clipboard.
#
#   echo hi | cnspr send --to laptop clipboard/set -
#   wl-paste | cnspr send --to laptop clipboard/set -     # copy from here to there
#
# Install: see "Example handlers" in docs/event_handlers.md (copy, do not link).
# Uses wl-copy (Debian: wl-clipboard) on Wayland (WAYLAND_DISPLAY set), else xclip (Debian:
# xclip) on X11 (DISPLAY set). The daemon's environment must hold those variables, as under
# systemd --user when the desktop imports them (most do).
set -eu

# wl-copy and xclip stay in the background to serve the clipboard: their output goes to
# /dev/null, or the handler service would wait for it.
if [ -n "${WAYLAND_DISPLAY:-}" ] && command -v wl-copy >/dev/null 2>&1; then
    wl-copy >/dev/null 2>&1 || { echo "wl-copy failed on $CNSPRCY_DEVICE"; exit 1; }
elif [ -n "${DISPLAY:-}" ] && command -v xclip >/dev/null 2>&1; then
    xclip -selection clipboard >/dev/null 2>&1 || { echo "xclip failed on $CNSPRCY_DEVICE"; exit 1; }
else
    echo "no clipboard on $CNSPRCY_DEVICE: needs wl-copy with WAYLAND_DISPLAY, or xclip with DISPLAY, in the daemon's environment"
    exit 1
fi
echo "clipboard set on $CNSPRCY_DEVICE"
