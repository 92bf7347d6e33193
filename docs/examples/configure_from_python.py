"""Change the policy from Python, without a policy file.

    allocpolicy run -- python docs/examples/configure_from_python.py
"""

import allocpolicy

print("started with:", allocpolicy.active_policy().source)

allocpolicy.configure(
    {
        "version": 1,
        "process": {"on_oom": "raise"},
        "scopes": {
            "batch": {"on_oom": "raise", "budget": "32 MiB"},
        },
    }
)
print("now:", allocpolicy.active_policy().source, "with scopes", list(allocpolicy.active_policy().scopes))

try:
    with allocpolicy.task("batch"):
        bytearray(48 << 20)
except allocpolicy.AllocError as err:
    print(f"batch refused {err.size >> 20} MiB: budget is {err.budget >> 20} MiB")

# A mistake is reported with its location, and the policy in force stays.
try:
    allocpolicy.configure({"version": 1, "scopes": {"batch": {"budget": "32 MiBs"}}})
except allocpolicy.PolicyError as err:
    print("rejected:", err)
print("batch budget still", allocpolicy.active_policy().scopes["batch"].budget >> 20, "MiB")
