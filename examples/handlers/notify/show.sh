#!/bin/sh
# cnsprcy example handler, tag notify/show: shows the payload as a desktop notification.
#
#   cnspr send --to laptop notify/show "the build finished"
#
# Install: see "Example handlers" in docs/event_handlers.md (copy, do not link).
# Needs notify-send (Debian: libnotify-bin) and the session's D-Bus (DBUS_SESSION_BUS_ADDRESS
# in the daemon's environment, as under systemd --user).
set -eu

# A notification is a glance, not a document: the first 1000 bytes are shown.
max_bytes=1000

if ! command -v notify-send >/dev/null 2>&1; then
    echo "notify-send is not installed on $CNSPRCY_DEVICE (Debian: apt install libnotify-bin)"
    exit 1
fi
body=$(head -c "$max_bytes")
if [ -z "$body" ]; then
    body="(empty message)"
fi
# `--` ends the options, so a payload starting with "-" is shown, not taken as an option.
notify-send --app-name=cnsprcy -- "from ${CNSPRCY_FROM:-?}" "$body"
echo "shown on $CNSPRCY_DEVICE"
