"""No-allocation regions, and counting the allocations of a block.

    allocpolicy run --policy docs/examples/no_alloc_policy.toml -- python docs/examples/no_alloc_regions.py
"""

import warnings

import numpy as np

import allocpolicy

a = np.ones(100_000)
b = np.ones(100_000)

# How many allocations does a block make (on this thread)?
with allocpolicy.count_allocs() as counted:
    np.add(a, b, out=a)  # in place: the result goes into a
print(f"np.add(a, b, out=a): {counted.allocations} allocations")

with allocpolicy.count_allocs() as counted:
    c = a + b  # a new array
print(f"a + b: {counted.allocations} allocation, {counted.bytes} bytes")
del c

# 1. The context manager.
with allocpolicy.no_alloc():
    np.multiply(a, 2.0, out=a)
print("no_alloc around np.multiply(a, 2.0, out=a): passed")

try:
    with allocpolicy.no_alloc():
        c = a * 2.0
except allocpolicy.AllocError as err:
    print(f"no_alloc around a * 2.0: AllocError, reason {err.reason!r}, size {err.size}")


# 2. The decorator.
@allocpolicy.no_alloc
def halve(x):
    np.multiply(x, 0.5, out=x)


halve(a)
print("@no_alloc halve(a): passed")

# 3. Explicit enter and exit, here with action="count": nothing is refused.
region = allocpolicy.no_alloc(action="count")
region.enter()
c = a + b
seen = region.exit()
del c
print(f"action='count': {seen.allocations} allocation(s), {seen.bytes} bytes, recorded only")

# action="warn": the allocations happen, one warning when the region ends.
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    with allocpolicy.no_alloc(action="warn"):
        c = a + b
del c
print(f"action='warn': {caught[0].message}")

# A scope declared with forbid = true in the policy is a region too.
with allocpolicy.scope("render"):
    np.subtract(a, b, out=a)
print("scope 'render': passed")
try:
    with allocpolicy.scope("render"):
        c = a - b
except allocpolicy.AllocError as err:
    print(f"scope 'render': AllocError in scope {err.scope!r}, size {err.size}")
