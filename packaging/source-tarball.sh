#!/usr/bin/env bash
# Make the source tarball rsockd-<version>.tar.gz (top directory rsockd-<version>/) that the
# Debian build unpacks and the Homebrew formula downloads.  Prints its path, then its sha256.
#
#   packaging/source-tarball.sh [OUT_DIR]               (default OUT_DIR: build/dist)
#   RSOCKD_SOURCE=head packaging/source-tarball.sh      exactly the committed tree (git archive HEAD)
#
# The default source is the tree as `git add -A && git commit` would record it: tracked files and
# untracked files that .gitignore does not exclude, with their working-tree contents (a deleted
# tracked file is left out); ignored files (.venv, build/, *.egg-info) never go in.  The tarball
# is reproducible: names sorted, owner root, file times those of the HEAD commit, modes without
# group/other write, gzip without a time stamp.  A release uses RSOCKD_SOURCE=head on the tag.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"
out=$(mkdir -p "${1:-build/dist}" && cd "${1:-build/dist}" && pwd)
version=$(python3 -c 'import sys, tomllib; print(tomllib.load(open(sys.argv[1], "rb"))["project"]["version"])' pyproject.toml)
name="rsockd-$version"
tarball="$out/$name.tar.gz"

if [ "${RSOCKD_SOURCE:-tree}" = head ]; then
  git archive --format=tar --prefix="$name/" HEAD | gzip -n -9 > "$tarball.tmp"
else
  git ls-files -z --cached --others --exclude-standard \
    | while IFS= read -r -d '' f; do { [ -e "$f" ] || [ -L "$f" ]; } && printf '%s\0' "$f"; done \
    | LC_ALL=C sort -z \
    | tar --null -T - -c --owner=0 --group=0 --numeric-owner --mode=go-w \
          --mtime="@$(git log -1 --format=%ct HEAD)" --transform="s,^,$name/," \
          --pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime \
    | gzip -n -9 > "$tarball.tmp"
fi
mv "$tarball.tmp" "$tarball"
echo "$tarball"
sha256sum "$tarball" | cut -d' ' -f1
