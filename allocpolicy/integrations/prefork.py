"""Pre-fork servers: the process budget divided among the worker processes.

``allocpolicy run`` resolves the policy's process budget once, in the process
it starts (a percentage against the cgroup limit or physical memory at that
moment), and every process forked from it inherits that number. A pre-fork
server (gunicorn, uWSGI, ...) therefore gives each of its N workers the whole
server's budget: three gunicorn workers under a 2 GiB cgroup and
``budget = "85%"`` each get 1.7 GiB, and together they can still drive the
cgroup into its OOM killer.

Read the policy's process budget as the budget of the whole server and give
each worker its share, with gunicorn's ``post_fork`` hook in its config file::

    # gunicorn.conf.py
    from allocpolicy.integrations.prefork import post_fork   # noqa: F401

or, for any other server, by calling :func:`share_process_budget` in each
worker once it has started (uWSGI's ``@postfork``; for ``uvicorn --workers N``
at the import of the application module, which each worker imports)::

    from allocpolicy.integrations.prefork import share_process_budget

    share_process_budget(workers=4)

The master process keeps the whole budget, which it does not use: it forks
and watches. Per-request and per-task scopes are unchanged.
"""

from __future__ import annotations

import os

from ._process_budget import process_budget, set_process_budget

__all__ = ["share_process_budget", "post_fork", "ENV_WORKERS"]

#: Environment variable read by :func:`share_process_budget` when no worker
#: count is given.
ENV_WORKERS = "ALLOCPOLICY_WORKERS"

# The server's budget, read the first time a share is taken; inherited by
# forked children, so that a share is always taken of the whole, never of a
# share (a hook in the master and again in each worker gives 1/N, not 1/N**2).
# No lock: this runs right after a fork, where a lock that another thread of
# the parent held would stay held; two threads taking a share at once compute
# the same one.
_whole: int | None = None


def share_process_budget(workers: int | None = None) -> int | None:
    """Set this process's budget to 1/``workers`` of the server's process budget.

    ``workers`` defaults to ``$ALLOCPOLICY_WORKERS``. Returns the new budget
    in bytes, or ``None`` when there is nothing to divide (no process budget,
    or no runtime). Calling it again, in this process or in a process forked
    from it, divides the server's budget again, not the share.

    Raises:
        ValueError: ``workers`` is not a positive int (or the variable is not one).
    """
    global _whole
    if workers is None:
        text = os.environ.get(ENV_WORKERS)
        if text is None:
            raise ValueError(f"share_process_budget(): give 'workers', or set {ENV_WORKERS}")
        try:
            workers = int(text)
        except ValueError:
            raise ValueError(f"{ENV_WORKERS} must be a positive integer, got {text!r}") from None
    if isinstance(workers, bool) or not isinstance(workers, int):
        raise TypeError(f"share_process_budget(): argument 'workers' must be int, not {type(workers).__name__}")
    if workers < 1:
        raise ValueError(f"share_process_budget(): argument 'workers' must be at least 1, got {workers}")
    if _whole is None:
        _whole = process_budget()
    if _whole is None:
        return None
    share = max(1, _whole // workers)
    set_process_budget(share)
    return share


def post_fork(server, worker) -> None:
    """gunicorn's ``post_fork`` hook: this worker gets 1/``workers`` of the
    process budget (``workers`` from gunicorn's configuration)."""
    share = share_process_budget(server.cfg.workers)
    if share is not None:
        server.log.info("allocpolicy: worker %s gets %d bytes of process budget (1/%d)",
                        worker.pid, share, server.cfg.workers)
