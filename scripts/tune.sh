#!/usr/bin/env bash
# Apply tuning/sysctl.conf one key at a time (so one failure does not stop the rest)
# and report what could not be changed: read-only keys (containers, non-init netns),
# keys missing on this kernel, and the open-files limits this shell cannot raise.
# usage: scripts/tune.sh [--dry-run] [FILE]
set -u
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DRY=0
[ "${1:-}" = --dry-run ] && { DRY=1; shift; }
FILE=${1:-$ROOT/tuning/sysctl.conf}
ok=0 same=0 failed=()
while IFS= read -r line; do
  line=${line%%#*}
  [[ $line =~ ^[[:space:]]*([a-z0-9_.-]+)[[:space:]]*=[[:space:]]*(.*[^[:space:]])[[:space:]]*$ ]] || continue
  key=${BASH_REMATCH[1]} want=${BASH_REMATCH[2]}
  have=$(sysctl -n "$key" 2>/dev/null | tr -s '\t ' ' ')
  if [ -z "$have" ] && ! sysctl -n "$key" >/dev/null 2>&1; then
    failed+=("$key: not present on this kernel / in this namespace"); continue
  fi
  if [ "$have" = "$(echo "$want" | tr -s '\t ' ' ')" ]; then same=$((same + 1)); continue; fi
  if [ $DRY = 1 ]; then echo "would set $key = $want (now $have)"; continue; fi
  if err=$(sysctl -qw "$key=$want" 2>&1); then
    ok=$((ok + 1)); echo "set $key = $want (was $have)"
  else
    failed+=("$key = $want: ${err:-failed} (still $have)")
  fi
done < "$FILE"
echo "sysctl: $ok changed, $same already set, ${#failed[@]} not changed"
for f in "${failed[@]}"; do echo "  NOT CHANGED: $f"; done

# Open-files limit: only the soft limit can be raised without privileges, and a hard
# limit set by the container/runtime cannot be raised at all from inside.
soft=$(ulimit -Sn) hard=$(ulimit -Hn)
want=1048576
echo "open files: soft $soft, hard $hard (herald raises its soft limit to the hard limit itself)"
if [ "$hard" != unlimited ] && [ "$hard" -lt $want ]; then
  if (ulimit -Hn $want) 2>/dev/null; then
    echo "  hard limit can be raised: run herald under 'ulimit -n $want' or LimitNOFILE=$want (tuning/herald.service)"
  else
    echo "  NOT CHANGED: RLIMIT_NOFILE hard limit $hard cannot be raised here (set by the container/runtime);"
    echo "  epoll backend: ~$((hard - 10)) connections per process; io_uring direct descriptors are not bound by it"
  fi
fi
memlock=$(ulimit -Hl)
echo "locked memory hard limit: $memlock (io_uring rings may be charged to it on older kernels)"
[ ${#failed[@]} -eq 0 ]
