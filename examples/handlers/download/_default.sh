#!/bin/sh
# cnsprcy example handler, tags download/NAME: saves the payload as ~/Downloads/NAME.
#
#   cnspr send --to laptop download/notes.txt - < notes.txt
#
# Install: see "Example handlers" in docs/event_handlers.md (copy, do not link). As
# download/_default, it handles every tag under download/; the last part of the tag is the file
# name, so it holds only letters, digits, '.', '_' and '-' (the rules for tags).
#
# Safe by construction: the name may not hold a '/' nor start with '.'; an existing file is
# never replaced (notes.txt exists: notes-1.txt, notes-2.txt, ...); at most max_bytes are saved.
set -eu

max_bytes=$((10 * 1024 * 1024))
dir="$HOME/Downloads"

name=${CNSPRCY_TAG#download/}
case "$name" in
    "" | */* | .* | *[!A-Za-z0-9._-]*)
        echo "refused: \"$name\" is not a safe file name (letters, digits, '.', '_', '-'; no leading '.')"
        exit 1 ;;
esac

mkdir -p "$dir"
# The payload goes to a hidden file first; only once it is whole and small enough does it get
# its name. set -C (noclobber) makes '>' fail on an existing file instead of replacing it.
set -C
tmp="$dir/.cnsprcy-download.$$"
trap 'rm -f "$tmp"' EXIT
trap 'exit 143' TERM
head -c "$((max_bytes + 1))" >"$tmp"
size=$(($(wc -c <"$tmp")))
if [ "$size" -gt "$max_bytes" ]; then
    echo "refused: larger than $max_bytes bytes"
    exit 1
fi

# ln fails if the name exists, so no file is ever replaced, even by one that appears meanwhile.
base=${name%.*}
ext=${name#"$base"}
candidate=$name
n=0
until ln "$tmp" "$dir/$candidate" 2>/dev/null; do
    if [ ! -e "$dir/$candidate" ] && [ ! -L "$dir/$candidate" ]; then
        echo "cannot save into $dir: linking $tmp to $candidate failed"
        exit 1
    fi
    n=$((n + 1))
    if [ "$n" -gt 999 ]; then
        echo "refused: $dir already holds $name and 999 numbered copies"
        exit 1
    fi
    candidate="$base-$n$ext"
done
echo "saved $size bytes as $dir/$candidate"
