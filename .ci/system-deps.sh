#!/usr/bin/env bash
# Debian packages used by the tests and benchmarks: allocator backends, a C
# and C++ toolchain with gcc's sanitizer runtimes, valgrind and libfiu's fiu-run. Idempotent; does nothing when everything is present.
set -euo pipefail
need=()
have_lib() { ls /usr/lib/*-linux-gnu/"$1" >/dev/null 2>&1; }
have_lib libjemalloc.so.2 || need+=(libjemalloc2)
have_lib libmimalloc.so.2 || need+=(libmimalloc2.0)
command -v cc >/dev/null || need+=(gcc)
# The C++ test programs (operator new/delete under the preload).
command -v c++ >/dev/null || need+=(g++)
command -v make >/dev/null || need+=(make)
# The sanitize session: gcc's sanitizer runtimes and objcopy.
command -v objcopy >/dev/null || need+=(binutils)
have_lib libtsan.so.2 || need+=(libtsan2)
have_lib libasan.so.8 || need+=(libasan8)
have_lib libubsan.so.1 || need+=(libubsan1)
command -v valgrind >/dev/null || need+=(valgrind)
# libfiu's fiu-run: the fault-injection tests compare their failures with it.
command -v fiu-run >/dev/null || need+=(fiu-utils)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "system-deps: missing ${need[*]}; install them (apt-get install ${need[*]})" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${need[@]}" >/dev/null
fi
