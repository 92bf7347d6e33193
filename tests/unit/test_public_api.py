"""The public namespace is curated: every name is exported on purpose."""

import allocpolicy


# Public modules of their own: attributes of the package once imported, never
# imported by it. The pytest plugin is loaded by pytest through the pytest11
# entry point; the metrics package when a program exports metrics; the
# integrations package when a program uses one.
SUBMODULES = {"pytest_plugin", "metrics", "integrations"}


def test_all_is_exactly_the_public_namespace():
    public = {name for name in dir(allocpolicy) if not name.startswith("_")}
    assert public - SUBMODULES == set(allocpolicy.__all__)


def test_the_metrics_namespace_is_curated_too():
    import allocpolicy.metrics as metrics

    # (pytest may add names that are no identifiers when it rewrites the package)
    names = {n for n in dir(metrics) if n.isidentifier() and not n.startswith("_")}
    assert names - {"prometheus", "otel"} == set(metrics.__all__)
    assert set(metrics.__all__) == {"CONTENT_TYPE", "METRICS", "Metric", "Sample", "prometheus_text", "samples"}


def test_observability_names_are_public():
    for name in ("on_refusal", "remove_refusal_hook", "serve_stats", "stats", "Stats"):
        assert name in allocpolicy.__all__


def test_on_refusal_wants_a_callable():
    import pytest

    with pytest.raises(TypeError, match="argument 'callback'"):
        allocpolicy.on_refusal(42)
    with pytest.raises(TypeError, match="argument 'address'"):
        allocpolicy.serve_stats(42)


def test_error_hierarchy_subclasses_the_stdlib_errors_it_resembles():
    assert issubclass(allocpolicy.AllocError, MemoryError)
    assert issubclass(allocpolicy.PolicyError, ValueError)
    assert issubclass(allocpolicy.UnknownScopeError, LookupError)
    assert issubclass(allocpolicy.RuntimeLoadError, OSError)
    assert issubclass(allocpolicy.ScopeCapacityError, RuntimeError)
    assert issubclass(allocpolicy.ScopeMismatchError, RuntimeError)
    for exc in (allocpolicy.AllocError, allocpolicy.PolicyError, allocpolicy.UnknownScopeError,
                allocpolicy.RuntimeLoadError, allocpolicy.ScopeCapacityError,
                allocpolicy.ScopeMismatchError):
        assert issubclass(exc, allocpolicy.AllocPolicyError)


def test_alloc_error_carries_its_facts_and_pickles():
    import pickle

    err = allocpolicy.AllocError(scope="request", size=100, budget=64, live=10,
                                 reason="budget", limit="budget", task="request")
    back = pickle.loads(pickle.dumps(err))
    assert (back.scope, back.size, back.budget, back.live, back.reason, back.limit, back.task) == (
        "request", 100, 64, 10, "budget", "budget", "request")
    assert str(back) == str(err) == (
        "allocation of 100 bytes refused in scope 'request': over its budget of 64 bytes "
        "(10 bytes live)")
    oom = allocpolicy.AllocError(scope="x", size=5, budget=None, live=0, reason="oom")
    assert str(oom) == "allocation of 5 bytes refused in scope 'x': the allocator is out of memory"


def test_wrong_arguments_name_the_argument():
    import pytest

    with pytest.raises(TypeError, match="argument 'name'"):
        allocpolicy.scope(3)
    with pytest.raises(ValueError, match="argument 'name'"):
        allocpolicy.task("")
    with pytest.raises(TypeError, match="argument 'fn'"):
        allocpolicy.bind(42)
    with pytest.raises(TypeError, match="argument 'policy'"):
        allocpolicy.configure(42)


def test_task_retries_are_checked_and_need_a_callable_form():
    import pytest

    with pytest.raises(ValueError, match="'retries' must be 0 or more"):
        allocpolicy.task("job", retries=-1)
    with pytest.raises(TypeError, match="'retries' must be int"):
        allocpolicy.task("job", retries=True)
    with pytest.raises(ValueError, match="'escalate' must be greater than 1"):
        allocpolicy.task("job", retries=1, escalate=1.0)
    with pytest.raises(TypeError, match="'escalate' must be a number"):
        allocpolicy.task("job", retries=1, escalate="2")
    with pytest.raises(TypeError, match="a with block cannot be run again"):
        with allocpolicy.task("job", retries=1):
            pass


def test_tasks_pickle_with_their_settings():
    import pickle

    import pytest

    plain = pickle.loads(pickle.dumps(allocpolicy.task("job")))
    assert isinstance(plain, allocpolicy.task) and plain.name == "job" and plain.retries == 0
    retried = pickle.loads(pickle.dumps(allocpolicy.task("job", retries=2, escalate=3.0)))
    assert isinstance(retried, allocpolicy.task)
    assert (retried.name, retried.retries, retried.escalate) == ("job", 2, 3.0)
    with pytest.raises(TypeError, match="a with block cannot be run again"):
        with retried:
            pass
