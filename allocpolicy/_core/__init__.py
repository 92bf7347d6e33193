"""The shared mechanisms every feature and integration builds on.

The package is layered; each layer imports only from the layers below it
(``tests/unit/test_layering.py`` checks it)::

    allocpolicy (the public namespace), _cli, pytest_plugin   entry points
    integrations/                       public API + _core only
    _scope, _regions, _fallible, _inject, _modules, _stats,   features
    _inprocess, _config, _configure
    _policy, _inject_settings           the policy model (no runtime state)
    _core/                              this package
    _native                             ctypes: the only module that calls C
    _errors, _sizes                     plain definitions

What lives here, one concern per module:

- :mod:`.names`: scope names and runtime ids, the one "not preloaded" warning;
- :mod:`.refusal`: the one conversion of a refused allocation into
  :class:`~allocpolicy.AllocError`, used by every boundary;
- :mod:`.instances`: handles on scope instances, for running work in an
  instance from another thread or another task step;
- :mod:`.stepping`: driving a generator or coroutine one step at a time, with
  a scope around each step and none while it is suspended.

Nothing here imports a feature module, and nothing here imports ``threading``:
some of it runs while every interpreter started by ``allocpolicy run`` starts.
"""
