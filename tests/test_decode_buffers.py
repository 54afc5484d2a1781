"""Graph safety of the decode state: nothing a captured decode step points at is freed or moved while it lives.

On CUDA, ``generate`` captures the decode step into a graph when it creates a configuration's ``DecodeState``
(before the first prefill) and keeps both for later calls. The graph holds raw addresses: the KV cache and its
position tables, the step's static inputs and outputs, token selection's buffers and the kernels' workspaces
(GEMV split-K partials, sparse-FFN buffers, decode attention's split partials). If any of them were reallocated
afterwards (say a workspace that grows when a longer prompt's prefill needs more room), replaying the graph would
read and write freed memory. The CPU path builds and owns the same state, so this is checked here, through the
fast model with every kernel under the interpreter: the addresses of every buffer of ``DecodeState.buffers()``
are recorded when the state is created and must be the same after every decode step and every call, over prompts
of 1 to 17 tokens at batch 1 and 3 (in increasing order, the order that made the old cache grow: 1 row, the
sparse FFN's 8-row kernel, the GEMV kernel's 16 rows, torch beyond). Every kernel launch of prefill and decode
must also be handed the state's own workspaces (not a module-level cache).

A small config (4 layers: sparse FFNs of two sizes, one sliding and one full owner layer, two KV-shared
layers) keeps this at ~30 s under the interpreter.
"""
import pytest
import torch

import gemma3n_fast
from gemma3n_fast import generate as gen_mod
from gemma3n_fast.reference.tiny import TINY_TEXT_VOCAB, write_tiny_checkpoint

TEXT = dict(num_hidden_layers=4, layer_types=["sliding_attention", "full_attention"] * 2,
            intermediate_size=[160, 144, 96, 128], activation_sparsity_pattern=[0.95, 0.95, 0.0, 0.0],
            num_kv_shared_layers=2, max_position_embeddings=512)
# (batch, prompt lengths): prefill rows B*T = 1, 16, 17 and 6, 15 (increasing: each needs more room; 16 is the
# GEMV kernel's last row count, 17 torch's first)
RUNS = [(1, (1, 16, 17)), (3, (2, 5))]
NEW_TOKENS = 3  # two decode steps per call
GEMV_OPS = ("linear", "linear_gelu_mul", "linear_gelu_aux", "linear_softcap", "qkv_projection_norm_rope_cache",
            "o_proj_post_attention", "down_altup_correct", "per_layer_projection_predict",
            "per_layer_projection_inject")  # every op whose launch uses the GEMV workspace (its counters included)


@pytest.fixture(scope="module")
def fast(tmp_path_factory):
    folder = write_tiny_checkpoint(tmp_path_factory.mktemp("tiny_buffers"), seed=5, multimodal=False,
                                   text_overrides=TEXT)
    return gemma3n_fast.load(folder, device="cpu", dtype=torch.float32, kernels="interpret")


def _addresses(st) -> dict[str, tuple]:
    return {name: (t.data_ptr(), t.untyped_storage().data_ptr(), tuple(t.shape)) for name, t in st.buffers().items()}


class _Watch:
    """Records each DecodeState's buffer addresses at creation, checks them after every decode step, and checks
    that every workspace-taking op gets the live state's workspaces (prefill and decode alike)."""

    def __init__(self, monkeypatch, fast):
        self.created, self.steps, self.calls, self.bad = [], 0, {}, []
        watch = self

        class State(gen_mod.DecodeState):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                watch.created.append((self, _addresses(self)))

        real_step = gen_mod._step

        def step(model, st):
            real_step(model, st)
            watch.steps += 1
            assert watch.created and st is watch.created[-1][0], "a decode step ran on a state not created last"
            now, then = _addresses(st), watch.created[-1][1]
            moved = sorted(k for k in then if now.get(k) != then[k])
            assert not moved, f"decode-state buffers moved after step {watch.steps}: {moved}"

        monkeypatch.setattr(gen_mod, "DecodeState", State)
        monkeypatch.setattr(gen_mod, "_step", step)
        for name in (*GEMV_OPS, "sparse_ffn_altup_correct", "sliding_window_attention_decode"):
            monkeypatch.setattr(fast.backend, name, self._wrap(name, getattr(fast.backend, name)))

    def _wrap(self, name, fn):
        def op(*args, workspace=None, **kwargs):
            self.calls[name] = self.calls.get(name, 0) + 1
            st = self.created[-1][0] if self.created else None
            ws = st.workspaces if st is not None else None
            if ws is None:
                self.bad.append(f"{name} outside generate()")
            elif name in GEMV_OPS:
                if workspace is not ws.gemv:
                    self.bad.append(f"{name}: not the state's GEMV workspace")
            elif name == "sparse_ffn_altup_correct":
                gate_weight = kwargs["gate_weight"] if "gate_weight" in kwargs else args[1]  # [I, H]
                if workspace is not ws.sparse.get(gate_weight.shape[0]) or workspace.gemv is not ws.gemv:
                    self.bad.append(f"{name}: not the state's sparse-FFN workspace")
            elif workspace is None or workspace is not ws.attention:
                self.bad.append(f"{name}: not the state's attention workspace")
            return fn(*args, workspace=workspace, **kwargs)

        return op


def test_decode_state_buffers_never_move(fast, monkeypatch):
    watch = _Watch(monkeypatch, fast)
    g = torch.Generator().manual_seed(0)
    for batch, lengths in RUNS:
        first = len(watch.created)
        for T in lengths:
            ids = torch.randint(10, TINY_TEXT_VOCAB, (batch, T), generator=g)
            out = fast.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=[])
            assert out.shape == (batch, T + NEW_TOKENS)
            assert len(watch.created) == first + 1, f"batch {batch}, prompt {T}: a new decode state was built"
            st, then = watch.created[-1]
            assert _addresses(st) == then, f"batch {batch}, prompt {T}: decode-state buffers moved"
        assert not watch.bad, sorted(set(watch.bad))
    assert watch.steps == sum(len(lengths) for _, lengths in RUNS) * (NEW_TOKENS - 1)
    assert set(watch.calls) == {*GEMV_OPS, "sparse_ffn_altup_correct", "sliding_window_attention_decode"}
    # the state owns one of everything: GEMV scratch shared by both sparse-FFN sizes, attention partials, KV cache
    ws = st.workspaces
    assert sorted(ws.sparse) == [144, 160] and all(s.gemv is ws.gemv for s in ws.sparse.values())
    assert ws.attention is not None and {"cache.k[0]", "cache.k[1]", "tokens", "out"} <= set(st.buffers())
