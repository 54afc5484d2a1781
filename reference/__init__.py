"""Plain-PyTorch Gemma 3n: the truth every kernel and the fast model are checked against.

Import as ``gemma3n_fast.reference`` (the folder sits at the top of the repository; see README).
"""
if __name__ != "gemma3n_fast.reference":  # one import path per module
    raise ImportError("this folder is the package 'gemma3n_fast.reference'; import it under that name")


def load(path_or_hub_id, device="cpu", dtype=None, **kwargs):
    """Load a checkpoint (local folder or hub id) as the reference model (fp32 on CPU by default)."""
    from gemma3n_fast.reference.model import load as _load

    return _load(path_or_hub_id, device=device, dtype=dtype, **kwargs)
