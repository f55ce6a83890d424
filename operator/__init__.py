"""The kubetune operator (import name `kubetune.operator`): API models, planners, kopf handlers,
status and metrics, and the local backend. Nothing in this package imports torch.

This folder is called `operator/`, like the standard library module. With the repository root
first on sys.path, `import operator` could land here; the guard below then runs the standard
library's operator.py in this module's place, so the folder never shadows it. (Only `os` and
builtins are used: importlib would import collections, which imports operator: a cycle.)
"""
if __name__ == "operator":  # imported as the top-level name, not as kubetune.operator
    import os as _os

    __file__ = _os.path.join(_os.path.dirname(_os.__file__), "operator.py")
    with open(__file__, encoding="utf-8") as _source:
        exec(compile(_source.read(), __file__, "exec"), globals())
