#!/usr/bin/env bash
# Put onnxruntime's C API headers under third_party/onnxruntime/include.
# The onnxruntime wheel ships none. Debian 13 packages them (libonnxruntime-dev); on Debian 12 the
# package is fetched from the next release with a private apt state so the system's apt is untouched.
# Only the headers are used: the operator library must not link libonnxruntime.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
dest="$root/third_party/onnxruntime/include"
if [ -f "$dest/onnxruntime_c_api.h" ]; then exit 0; fi
for sys in /usr/include/onnxruntime /usr/include; do
  if [ -f "$sys/onnxruntime_c_api.h" ]; then
    mkdir -p "$dest"; cp "$sys"/onnxruntime_*.h "$dest"/; exit 0
  fi
done
if ! command -v apt-get >/dev/null; then
  echo "fetch_ort_headers: no apt-get; put onnxruntime's include/ (onnxruntime_c_api.h ...) in $dest" >&2
  exit 1
fi
. /etc/os-release
if [ "${VERSION_CODENAME:-}" = "trixie" ] || [ "${VERSION_ID:-0}" -ge 13 ] 2>/dev/null; then
  apt-get install -y --no-install-recommends libonnxruntime-dev >/dev/null
  mkdir -p "$dest"; cp /usr/include/onnxruntime/onnxruntime_*.h "$dest"/; exit 0
fi
# Debian 12: the mirror the system already uses, suite trixie, in a private state directory.
mirror=$( (grep -hs '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2}';
           grep -hs '^deb ' /etc/apt/sources.list | awk '{print $2}') | grep -v security | grep -i debian | head -n1 || true)
if [ -z "$mirror" ]; then echo "fetch_ort_headers: no Debian mirror found in the apt sources" >&2; exit 1; fi
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
mkdir -p "$work/lists/partial" "$work/cache/archives/partial" "$work/parts"
: > "$work/status"
echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror trixie main" > "$work/sources.list"
opts=(-o Dir::Etc::SourceList="$work/sources.list" -o Dir::Etc::SourceParts="$work/parts"
      -o Dir::State::Lists="$work/lists" -o Dir::Cache="$work/cache" -o Dir::State::status="$work/status"
      -o APT::Architecture="$(dpkg --print-architecture)")
apt-get "${opts[@]}" update >/dev/null
(cd "$work" && apt-get "${opts[@]}" download libonnxruntime-dev >/dev/null)
dpkg-deb -x "$work"/libonnxruntime-dev_*.deb "$work/x"
mkdir -p "$dest"
cp "$work"/x/usr/include/onnxruntime/onnxruntime_*.h "$dest"/
echo "fetch_ort_headers: headers in $dest"
