"""conftest.py's interpreter shortcut (a device-function call inside a launch skips re-patching triton.language
once the launch has patched it) is active on the Triton the CPU machines pin, skips the repeated scans, and
changes no result: the same kernels give bit-identical outputs with the interpreter as Triton ships it. And its
mask check: an interpreted load or store whose mask data is not bool fails on every Triton, as on 3.9."""
import pytest
import torch
import triton
import triton.language as tl

import conftest
from kernel_checks import randn

pytestmark = pytest.mark.interpreter


def _run():
    """Two row-wise kernels whose jit helpers live in kernels/_rowwise.py and call tl.sum (tl.core's patch), in
    fp32 and bf16 (the explicit roundings), over rows not a power of two."""
    from gemma3n_fast.kernels.altup_correct import altup_correct
    from gemma3n_fast.kernels.rms_norm import rms_norm

    outs, A, H = [], 4, 72
    for dtype in (torch.float32, torch.bfloat16):
        x, r = randn((5, H), dtype, 1, scale=3.0, shift=0.5), randn((5, H), dtype, 2)
        outs.append(rms_norm(x, randn((H,), dtype, 3), 1e-6, r))
        preds, act = randn((A, 1, 3, H), dtype, 4), randn((1, 3, H), dtype, 5)
        outs.extend(altup_correct(preds, act, randn((H,), dtype, 6, scale=0.3, shift=1.0),
                                  randn((A, H), dtype, 7, scale=8.0), randn((A, A), dtype, 8, scale=0.5),
                                  randn((H,), dtype, 9), 1e-6, 1))
    return outs


def test_the_shortcut_is_on_and_changes_no_bit(monkeypatch):
    import triton
    import triton.runtime.interpreter as interp

    if triton.__version__.startswith(conftest.INTERPRETER_SHORTCUT_VERSIONS):
        assert conftest.INTERPRETER_SHORTCUT, f"the interpreter shortcut did not apply to triton {triton.__version__}"
    if not conftest.INTERPRETER_SHORTCUT:  # another Triton: the interpreter must be left exactly as shipped
        assert not conftest.INTERPRETER_ORIGINALS and interp.GridExecutor.__call__.__module__ == interp.__name__
        before = dict(conftest.INTERPRETER_SHORTCUT_COUNTS)
        assert len(_run()) == 6 and conftest.INTERPRETER_SHORTCUT_COUNTS == before
        return
    counts = conftest.INTERPRETER_SHORTCUT_COUNTS
    before = dict(counts)
    fast = _run()
    patched, skipped = (counts[k] - before[k] for k in ("patched", "skipped"))
    assert patched >= 4 and skipped > 4 * patched, f"{patched} patches, {skipped} skipped: the shortcut is idle"

    # the interpreter as Triton ships it: every device call patches again
    monkeypatch.setattr(interp.GridExecutor, "__call__", conftest.INTERPRETER_ORIGINALS["launch"])
    monkeypatch.setattr(interp, "_patch_lang", conftest.INTERPRETER_ORIGINALS["patch_lang"])
    plain = _run()
    assert counts == {"patched": before["patched"] + patched, "skipped": before["skipped"] + skipped}
    assert len(fast) == len(plain) == 6
    for i, (a, b) in enumerate(zip(fast, plain)):
        assert a.dtype == b.dtype and torch.equal(a, b), f"output {i}: the shortcut changed a result"


@triton.jit
def _copy_if(x_ptr, flag_ptr, out_ptr, n, BLOCK: tl.constexpr, AS_BOUND: tl.constexpr):
    cols = tl.arange(0, BLOCK)
    flag = tl.load(flag_ptr)
    if AS_BOUND:
        mask = cols < tl.where(flag >= 0, n, 0)
    else:
        mask = (cols < n) & (flag >= 0)  # a block & a scalar comparison: int32 data in the interpreter
    tl.store(out_ptr + cols, tl.load(x_ptr + cols, mask=mask, other=0.0), mask=mask)


def test_a_mask_without_bool_data_fails_as_on_triton_3_9():
    assert conftest.STRICT_INTERPRETER_MASKS, "conftest's mask check is not installed"
    x, flag = randn((13,), torch.float32, 11), torch.tensor([2], dtype=torch.int32)
    out = torch.full((16,), float("nan"))
    _copy_if[(1,)](x, flag, out, 13, BLOCK=16, AS_BOUND=True)
    assert torch.equal(out[:13], x) and out[13:].isnan().all()
    with pytest.raises(Exception, match="mask data is int32, not bool"):
        _copy_if[(1,)](x, flag, out, 13, BLOCK=16, AS_BOUND=False)
