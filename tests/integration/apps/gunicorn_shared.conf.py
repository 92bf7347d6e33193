# gunicorn configuration of the pre-fork test: each worker gets its share of
# the process budget.
from allocpolicy.integrations.prefork import post_fork  # noqa: F401
