#!/bin/sh
# cnsprcy example handler, tag device/status: answers with this device's battery and load.
#
#   cnspr send --all --wait device/status
#
# Install: see "Example handlers" in docs/event_handlers.md (copy, do not link).
# Reads /sys/class/power_supply and /proc/loadavg; needs nothing else. Prints, for example:
#
#   battery BAT0 87% Discharging
#   load 0.52 0.41 0.30
#
# or "battery none" on a device without one.
set -eu

# Where the kernel lists power supplies (the tests point it at a fake one).
power_supply=${CNSPRCY_POWER_SUPPLY_DIR:-/sys/class/power_supply}

found=no
for supply in "$power_supply"/*; do
    [ -r "$supply/type" ] || continue
    [ "$(cat "$supply/type")" = Battery ] || continue
    capacity=$(cat "$supply/capacity" 2>/dev/null || echo "?")
    state=$(cat "$supply/status" 2>/dev/null || echo "Unknown")
    echo "battery ${supply##*/} $capacity% $state"
    found=yes
done
if [ "$found" = no ]; then
    echo "battery none"
fi
read -r one five fifteen _ </proc/loadavg
echo "load $one $five $fifteen"
