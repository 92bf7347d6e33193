"""A job refused by its own budget runs again, with more room for that run only.

    allocpolicy run --policy docs/examples/quickstart_policy.toml -- python docs/examples/task_retries.py
"""

import allocpolicy


@allocpolicy.task("request", retries=2, escalate=2.0)
def render(pages: int) -> int:
    # 1 MiB per page: a 100-page render needs more than the request's 64 MiB.
    return len(bytearray(pages << 20)) >> 20


print(f"rendered {render(100)} MiB: refused at 64 MiB, done at 128 MiB")

try:
    render(1000)  # refused at 64, 128 and 256 MiB
except allocpolicy.AllocError as err:
    print(f"gave up: {err.size >> 20} MiB refused under a budget of {err.budget >> 20} MiB")

# Other requests keep the policy's budget.
print(f"the scope's budget is still {allocpolicy.stats().scopes['request'].budget >> 20} MiB")
