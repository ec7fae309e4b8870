"""Import safety the broader interop tests leave open: no builtin is callable from a meta.pkl,
and a missing weight is never mistaken for a missing bias."""

from __future__ import annotations

import pickle
import re

import pytest
from test_interop import nanogpt_state, write_meta, write_nanogpt

from tinygpt.interop import InteropError, read_meta, read_nanogpt


class _ExecWritesAFile:
    """Unpickling this with an unpickler that trusts `builtins` runs `exec`: a file appears."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return exec, (f"open({str(self.path)!r}, 'w').close()",)


@pytest.mark.parametrize("protocol", [0, 2, pickle.HIGHEST_PROTOCOL])
def test_a_meta_pkl_calling_builtins_exec_is_refused_without_running(tmp_path, protocol):
    """`builtins` holds `exec`, `eval` and `getattr`: trusting that module alone lets a pickle run
    any code. Protocol 0 reaches it through GLOBAL, later ones through STACK_GLOBAL."""
    marker = tmp_path / "ran"
    payload = pickle.dumps({"itos": _ExecWritesAFile(marker)}, protocol=protocol)
    assert b"builtin" in payload and b"exec" in payload  # __builtin__ before protocol 3
    (tmp_path / "meta.pkl").write_bytes(payload)
    with pytest.raises(InteropError, match="refusing"):
        read_meta(tmp_path / "meta.pkl")
    assert not marker.exists()


@pytest.mark.parametrize("missing", ["h.0.attn.c_proj.weight", "ln_f.weight", "wpe.weight"])
def test_a_bias_free_nanogpt_checkpoint_missing_a_weight_is_refused_by_name(tmp_path, missing):
    """`bias=False` checkpoints lack their biases, which are exactly zeros; a missing *weight* is
    a damaged file, and filling it with zeros would import a broken model without a word."""
    state = nanogpt_state(1, 2, 8, 5, 6, bias=False, seed=0)
    del state[f"transformer.{missing}"]
    path = write_nanogpt(tmp_path, state, n_layer=1, n_head=2, n_embd=8, vocab=5, block=6,
                         bias=False)
    write_meta(tmp_path, "abcde")
    with pytest.raises(InteropError, match=f"has no weight '{re.escape(missing)}'"):
        read_nanogpt(path)
