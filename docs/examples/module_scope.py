"""A gzip bomb stopped by a scope bound to the gzip module.

    allocpolicy run --policy module_scope.toml -- python module_scope.py

The policy binds the module to the scope "unpack"; this program never names
that scope, it only catches AllocError.
"""

import gzip
import sys

import allocpolicy

if not allocpolicy.is_active():
    sys.exit("run this example with: allocpolicy run --policy module_scope.toml -- python module_scope.py")

upload = gzip.compress(bytes(64 << 20))  # 64 MiB of zeros in about 64 KiB
try:
    data = gzip.decompress(upload)
    print(f"decompressed {len(data)} bytes")
except allocpolicy.AllocError as err:
    print(f"upload refused in scope {err.scope!r}: over its budget of {err.budget} bytes")

print(f"a small upload: {len(gzip.decompress(gzip.compress(b'hello ' * 1000)))} bytes")
buffer = bytearray(64 << 20)  # outside gzip, no budget applies
print(f"outside gzip: {len(buffer) >> 20} MiB allocated")
