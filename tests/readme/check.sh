#!/usr/bin/env bash
# Every ```cpp block of the README is compiled: the comment line before it names the file of
# tests/readme/ that holds it, and this check finds the block's lines there, in order, spaces
# collapsed (the file adds only the context a fragment needs: main(), the application's
# stand-ins; clang-format may indent it).
#   bash tests/readme/check.sh README.md tests/readme
set -euo pipefail
readme=$1 dir=$2
awk -v dir="$dir" '
  function trim(s) { gsub(/[ \t]+/, " ", s); sub(/^ /, "", s); sub(/ $/, "", s); return s }
  function check(   file, n, line, lines, i, j, found) {
    if (holder == "") { printf "README.md:%d: a cpp block without <!-- compiled in tests/readme/FILE -->\n", start; bad = 1; return }
    file = dir "/" holder
    n = 0
    while ((getline line < file) > 0) { line = trim(line); if (line != "") lines[++n] = line }
    close(file)
    if (n == 0) { printf "README.md:%d: %s is missing or empty\n", start, file; bad = 1; return }
    j = 1
    for (i = 1; i <= m; i++) {
      while (j <= n && lines[j] != block[i]) j++
      if (j > n) { printf "README.md:%d: not in %s (in this order): %s\n", at[i], file, block[i]; bad = 1; return }
      j++
    }
    blocks++
  }
  /^```cpp/ { inside = 1; m = 0; start = NR; holder = pending; pending = ""; next }
  inside && /^```/ { inside = 0; check(); next }
  inside { l = trim($0); if (l != "") { block[++m] = l; at[m] = NR }; next }
  /^<!-- compiled in tests\/readme\/[^ ]+ -->/ { pending = $4; sub(/^tests\/readme\//, "", pending); next }
  /[^ \t]/ { pending = "" }
  END {
    if (bad) exit 1
    if (blocks == 0) { print "no cpp block found in the README"; exit 1 }
    printf "%d README cpp blocks found in %s\n", blocks, dir
  }
' "$readme"
