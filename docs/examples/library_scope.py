import os
import zlib

data = os.urandom(1 << 20)

# Level 9 with the largest window needs about 256 KiB of libz's own state:
# libz gets NULL and reports it, and the zlib module raises MemoryError.
try:
    zlib.compress(data, 9)
except MemoryError as exc:
    print("compress, level 9:", type(exc).__name__, "-", exc)

# A smaller window and memory level fit the budget.
small = zlib.compressobj(1, zlib.DEFLATED, 10, 2)
packed = small.compress(data) + small.flush()
print("compress, small window:", len(packed) >= len(data) // 2)

# Decompression needs a window and a little state: it fits too.
print("decompress:", zlib.decompress(packed, 10) == data)

# The budget is libz's alone: the program itself allocates freely.
block = bytearray(64 << 20)
print("the program allocated", len(block) >> 20, "MiB")
