#!/usr/bin/env bash
# Publish events to herald's ingest socket with nothing but bash (/dev/tcp).
#   scripts/examples/publish.sh TOPIC DATA [EVENT]      (HERALD_INGEST=host:port, default 127.0.0.1:7070)
set -euo pipefail
topic=${1:?topic}; data=${2:?data}; event=${3:-}
addr=${HERALD_INGEST:-127.0.0.1:7070}
json_escape() { local s=${1//\\/\\\\}; s=${s//\"/\\\"}; s=${s//$'\n'/\\n}; s=${s//$'\r'/\\r}; s=${s//$'\t'/\\t}; printf '%s' "$s"; }
line="{\"topic\":\"$(json_escape "$topic")\",\"data\":\"$(json_escape "$data")\""
[ -n "$event" ] && line+=",\"event\":\"$(json_escape "$event")\""
line+="}"
exec 3<>"/dev/tcp/${addr%:*}/${addr##*:}"
printf '%s\n' "$line" >&3
# Half-close is not possible with /dev/tcp; herald answers only bad lines, so read briefly.
timeout 0.5 cat <&3 || true
exec 3>&-
