"""The same test for both versions of the catalogue cache.

Both pass an ordinary run. Under the OOM sweep, the body runs again and again
with its 1st, 2nd, 3rd, ... allocation failing; ``catalog`` keeps the
half-built record in its cache after each failure and the sweep reports it as
a leak on the error path, with the allocation index that reproduces it;
``catalog_fixed`` passes::

    allocpolicy run -- python -m pytest examples/oom_sweep_demo
"""

import json

import pytest

import catalog
import catalog_fixed

# A catalogue of 60 items, about 12 KiB of JSON.
TEXT = json.dumps(
    [{"sku": f"SKU-{n:04d}", "name": f"widget {n}", "tags": ["blue", "steel"] * 8, "price": n * 0.25}
     for n in range(60)]
)


@pytest.fixture(params=[catalog, catalog_fixed], ids=["catalog", "catalog_fixed"])
def cache(request):
    return request.param


@pytest.mark.oom_sweep
def test_lookup_by_sku(cache):
    record = cache.load("spring", TEXT)
    try:
        assert record.index["SKU-0007"]["price"] == 1.75
    finally:
        cache.evict("spring")
