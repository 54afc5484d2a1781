"""gemma3n_fast: Triton kernels that make Gemma 3n generate fast, proven equal to a plain-PyTorch reference.

    import gemma3n_fast
    model = gemma3n_fast.load("google/gemma-3n-E2B-it")   # or a local folder
    print(model.chat([{"role": "user", "content": [{"type": "text", "text": "Hi!"}]}]))

Importing this package imports neither triton nor transformers.
"""
__version__ = "0.1.0"

__all__ = ["load", "__version__"]


def load(path_or_hub_id, device=None, dtype=None, kernels=None, revision=None, matformer=None, num_threads=None,
         quantize=None, group_size=64):
    """Load a Gemma 3n checkpoint (local folder or hub id) as the fast model; see ``gemma3n_fast.loading.load``.
    ``matformer="E2B"`` (on an E4B checkpoint) or ``{"ffn_hidden_dims": [...], "layers_skipped": [...]}`` loads a
    MatFormer slice, reading only its part of the weights. ``quantize="int8" | "int4"`` stores the weights the
    decode step reads quantized (int4: groups of ``group_size``), quantized as they are read."""
    from gemma3n_fast.loading import load as _load

    return _load(path_or_hub_id, device=device, dtype=dtype, kernels=kernels, revision=revision, matformer=matformer,
                 num_threads=num_threads, quantize=quantize, group_size=group_size)
