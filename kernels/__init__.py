"""Hand-written Triton kernels, one op per module; import as ``gemma3n_fast.kernels`` (see README, "Import names").

With the repository root on ``sys.path`` (pytest, ``python -m`` from the checkout) this folder is also found as
a top-level package ``kernels``: the import name of Hugging Face's ``kernels`` distribution, which transformers
probes for by importing it. Under that name this file therefore neither raises (transformers would fail to
import its models) nor exposes anything: it hands the name to another ``kernels`` on ``sys.path`` if there is
one (Hugging Face's keeps working), else stays an empty package without a version (transformers then treats
the hub package as absent). The kernel modules themselves refuse any name but ``gemma3n_fast.kernels.*``.
"""
if __name__ != "gemma3n_fast.kernels":
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _root = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
    _spec = importlib.machinery.PathFinder.find_spec(
        __name__, [p for p in sys.path if os.path.realpath(p or os.curdir) != _root])
    if _spec is not None:  # another package owns this name: import it in this one's place
        _module = importlib.util.module_from_spec(_spec)
        sys.modules[__name__] = _module
        _spec.loader.exec_module(_module)
    del _root, _spec

    def __getattr__(name):
        raise AttributeError(f"'{__name__}' here is the gemma3n_fast repository's kernels/ folder, which is "
                             f"importable only as 'gemma3n_fast.kernels' (no attribute {name!r})")
