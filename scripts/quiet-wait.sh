# Shared by the bench scripts: wait (up to QUIET_MAX seconds, set by the caller) until no
# core was more than 15 % busy over 3 seconds, and log how long that took. The box is
# shared with builds and tests; a measurement taken next to them is not one.
quiet_wait() {
  local t0=$SECONDS a b worst
  while :; do
    a=$(grep -E '^cpu[0-9]+ ' /proc/stat); sleep 3; b=$(grep -E '^cpu[0-9]+ ' /proc/stat)
    worst=$(python3 - "$a" "$b" <<'PY'
import sys
def parse(s):
    return {l.split()[0]: list(map(int, l.split()[1:])) for l in s.splitlines()}
a, b = parse(sys.argv[1]), parse(sys.argv[2])
w = 0
for c in a:
    d = [y - x for x, y in zip(a[c], b[c])]
    tot = sum(d[:8]) or 1
    w = max(w, 100 * (tot - d[3] - d[4]) / tot)
print(int(w))
PY
)
    if [ "$worst" -lt 15 ] || [ $((SECONDS - t0)) -ge "$QUIET_MAX" ]; then
      echo "   quiet: busiest core ${worst}% after waiting $((SECONDS - t0)) s" >&2
      return 0
    fi
  done
}
