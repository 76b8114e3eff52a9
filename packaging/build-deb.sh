#!/usr/bin/env bash
# Build rsockd_<version>_<arch>.deb from a clean copy of the tree and check it with lintian.
#
#   sudo packaging/build-deb.sh [OUT_DIR]        (default OUT_DIR: build/deb)
#   RSOCKD_SOURCE=head packaging/build-deb.sh    build exactly the committed tree (git archive HEAD)
#
# The source is packaging/source-tarball.sh's tarball, unpacked: by default the tree as
# `git add -A && git commit` would record it (tracked and untracked files, not the ignored ones:
# never .venv, build/ or *.egg-info).  packaging/debian/ becomes debian/ of that copy.  The version comes from pyproject.toml and must
# match the top entry of packaging/debian/changelog.  Missing build dependencies (and lintian)
# are installed with apt.  lintian must report no error and no warning that is not overridden.
# Prints the path of the .deb as its last line.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"
out=$(mkdir -p "${1:-build/deb}" && cd "${1:-build/deb}" && pwd)
# Debian's interpreters and tools, whatever else (pyenv, a venv) is first on PATH.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
export DEBIAN_FRONTEND=noninteractive LC_ALL=C.UTF-8

version=$(python3 -c 'import sys, tomllib; print(tomllib.load(open(sys.argv[1], "rb"))["project"]["version"])' pyproject.toml)
# Read the changelog's top line directly: dpkg-parsechangelog needs dpkg-dev, maybe not yet here.
chver=$(sed -n '1s/^rsockd (\([^)]*\)).*/\1/p' packaging/debian/changelog)
if [ "$chver" != "$version" ]; then
  echo "build-deb: pyproject.toml has version $version but packaging/debian/changelog starts with" \
       "${chver:-nothing}; add a changelog entry for $version" >&2
  exit 1
fi

apt_install() {
  # Quietly, and `apt-get update` first only when the package lists do not know the packages.
  apt-get install -y -q --no-install-recommends "$@" >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends "$@"; }
}
command -v dpkg-buildpackage >/dev/null && command -v lintian >/dev/null || apt_install dpkg-dev lintian

work="$out/work"
src="$work/rsockd-$version"
rm -rf "$work"
mkdir -p "$work"
tarball=$(packaging/source-tarball.sh "$work")
tarball=${tarball%%$'\n'*}   # first line: the path (then the sha256)
tar -xzf "$tarball" -C "$work"
echo "build-deb: source: ${RSOCKD_SOURCE:-tree} of $(git rev-parse --short HEAD) ($(basename "$tarball"))"
cp -a packaging/debian "$src/debian"

cd "$src"
if ! dpkg-checkbuilddeps >/dev/null 2>&1; then
  echo "build-deb: installing build dependencies"
  apt-get build-dep -y -q ./ >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get build-dep -y -q ./; }
fi

# Reproducible file dates: the changelog's date, not the moment of the build.
SOURCE_DATE_EPOCH=$(date -d "$(dpkg-parsechangelog -S Date)" +%s)
export SOURCE_DATE_EPOCH
# The source package only feeds lintian's source checks (debian/control, rules, copyright); it is
# made first, from the pristine copy.
(cd "$work" && dpkg-source -b "rsockd-$version" >/dev/null)
dpkg-buildpackage -us -uc -b > "$work/build.log" 2>&1 \
  || { tail -n 60 "$work/build.log" >&2; echo "build-deb: dpkg-buildpackage failed; log: $work/build.log" >&2; exit 1; }

deb="rsockd_${version}_$(dpkg --print-architecture).deb"
echo "== lintian"
if ! lintian --fail-on error,warning --display-info \
     "$work"/rsockd_"${version}"_*.changes "$work/rsockd_${version}.dsc" 2>&1 | tee "$work/lintian.log"; then
  echo "build-deb: lintian found errors or warnings (log: $work/lintian.log)" >&2
  exit 1
fi

cp "$work/$deb" "$out/$deb"
echo "$out/$deb"
