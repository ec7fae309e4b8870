"""Checkpoints: round trip, atomic layout, a write cut at every file operation, tamper and
malicious-pickle refusal, latest run."""

import hashlib
import json
import os
import pickle

import pytest
import torch

from tinygpt.checkpoint import (
    CheckpointError,
    checkpoint_dirs,
    latest_run,
    load_checkpoint,
    load_state,
    save_checkpoint,
)
from tinygpt.config import ModelConfig
from tinygpt.model import TinyDecoderModel
from tinygpt.tokenizer import CharTokenizer

TOKENIZER = CharTokenizer.from_text("abcdefg \n")
CONFIG = ModelConfig.preset("seed", vocab_size=TOKENIZER.vocab_size, max_seq=8)


def _model(seed=0):
    torch.manual_seed(seed)
    return TinyDecoderModel(CONFIG)


def _sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _save(run_dir, step=5, model=None, **kwargs):
    return save_checkpoint(run_dir, model=model or _model(), tokenizer=TOKENIZER, step=step,
                           **kwargs)


def test_roundtrip_weights_tokenizer_config_step(tmp_path):
    model = _model()
    opt = torch.optim.AdamW(model.parameters())
    model(torch.zeros(1, 4, dtype=torch.long)).sum().backward()
    opt.step()
    rng = torch.get_rng_state()
    _save(tmp_path, model=model, state={"optimizer": opt.state_dict(), "rng": rng})
    ckpt = load_checkpoint(tmp_path)
    assert ckpt.step == 5 and ckpt.config == CONFIG and not ckpt.model.training
    assert ckpt.tokenizer.to_dict() == TOKENIZER.to_dict()
    for (name, a), (_, b) in zip(model.state_dict().items(), ckpt.model.state_dict().items()):
        assert torch.equal(a, b), name
    state = load_state(ckpt.path)
    assert torch.equal(state["rng"], rng)
    opt2 = torch.optim.AdamW(ckpt.model.parameters())
    opt2.load_state_dict(state["optimizer"])
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"],
                       opt.state_dict()["state"][0]["exp_avg"])


def test_only_newest_kept_and_no_temporaries_left(tmp_path):
    for step in (1, 2, 3):
        _save(tmp_path, step=step)
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["ckpt-00000003"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-00000003"]
    assert load_checkpoint(tmp_path).step == 3


def test_interrupted_write_is_ignored(tmp_path):
    """A temporary directory left by a killed writer is never taken for a checkpoint."""
    _save(tmp_path, step=1)
    partial = tmp_path / ".tmp-ckpt-dead"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"\0" * 10)
    assert load_checkpoint(tmp_path).step == 1
    _save(tmp_path, step=2)
    assert not partial.exists()


def test_vocab_mismatch_refused_on_save(tmp_path):
    with pytest.raises(CheckpointError, match="vocab_size"):
        save_checkpoint(tmp_path, model=_model(), tokenizer=CharTokenizer.from_text("ab"), step=1)


@pytest.mark.parametrize("name", ["model.safetensors", "config.json", "tokenizer.json", "state.pt"])
def test_missing_file_is_named(tmp_path, name):
    path = _save(tmp_path)
    (path / name).unlink()
    with pytest.raises(CheckpointError, match=f"missing {name}"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize("name",
                         ["model.safetensors", "config.json", "tokenizer.json", "meta.json"])
def test_altered_file_is_caught(tmp_path, name):
    path = _save(tmp_path)
    data = bytearray((path / name).read_bytes())
    data[-2] ^= 1
    (path / name).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"{name}.*altered"):
        load_checkpoint(tmp_path)


def test_missing_manifest(tmp_path):
    path = _save(tmp_path)
    (path / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="manifest.json.*missing"):
        load_checkpoint(tmp_path)


class _Exploit:
    """Unpickling this would create a marker file: proof that code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_malicious_pickle_refused_without_running(tmp_path):
    path = _save(tmp_path)
    marker = tmp_path / "pwned"
    with open(path / "state.pt", "wb") as f:
        pickle.dump({"optimizer": _Exploit(marker)}, f)
    # An attacker who can write the state file can also rewrite the manifest: refuse regardless.
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["state.pt"] = _sha256(path / "state.pt")
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="refusing to load"):
        load_state(path)
    assert not marker.exists()
    # Sanity: the same pickle does run code when loaded unsafely, so the test can fail.
    with open(path / "state.pt", "rb") as f:
        pickle.load(f)
    assert marker.exists()


def test_weights_that_do_not_fit_config(tmp_path):
    path = _save(tmp_path)
    config = json.loads((path / "config.json").read_text())
    config["d_ff"] = 32
    (path / "config.json").write_text(json.dumps(config))
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["config.json"] = _sha256(path / "config.json")
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="do not fit"):
        load_checkpoint(tmp_path)


def test_no_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        load_checkpoint(tmp_path / "empty")
    with pytest.raises(CheckpointError, match="no run with a checkpoint"):
        latest_run(tmp_path)


def test_latest_run_is_newest_written(tmp_path):
    a = _save(tmp_path / "a", step=9)
    b = _save(tmp_path / "b", step=1)
    os.utime(a, ns=(1, 1))
    assert latest_run(tmp_path) == tmp_path / "b"
    os.utime(b, ns=(0, 0))
    assert latest_run(tmp_path) == tmp_path / "a"


class _Crash(Exception):
    """Raised by the probe in place of a file operation: the writer dies there."""


def _save_cut_at(run, cut, model, monkeypatch):
    """Save `model` as checkpoint 2 of `run` with its `cut`-th file operation raising `_Crash`.

    Before every operation the probe loads each `ckpt-*` directory, as a reader would find them
    if the writer were killed there. Returns the operations called (the cut one last; None if
    the save finished first) and the problems the probe found.
    """
    import tinygpt.checkpoint as module

    calls, broken = [], []

    def probe(name, operation):
        def probed(*args, **kwargs):
            calls.append(name)
            for path in checkpoint_dirs(run):
                try:
                    load_checkpoint(path)
                except CheckpointError as error:
                    broken.append(f"before {name} (operation {len(calls)}): {error}")
            if len(calls) == cut:
                raise _Crash(name)
            return operation(*args, **kwargs)
        return probed

    with monkeypatch.context() as patch:
        for name in ("make_temp_dir", "_write_bytes", "_write_json", "_fsync_dir"):
            patch.setattr(module, name, probe(name, getattr(module, name)))
        patch.setattr(os, "rename", probe("os.rename", os.rename))
        try:
            _save(run, step=2, model=model)
        except _Crash:
            return calls, broken
    return None, broken


def test_a_write_cut_at_any_file_operation_leaves_only_complete_checkpoints(tmp_path, monkeypatch):
    """Cut the write of checkpoint 2 at each of its file operations in turn, beside a saved
    checkpoint 1: no `ckpt-*` directory is ever incomplete, and afterwards the run loads
    checkpoint 1 unchanged, or checkpoint 2 whole once its rename has happened."""
    old, new = _model(0), _model(1)
    cut_names = []
    for cut in range(1, 100):
        run = tmp_path / f"cut-{cut}"
        _save(run, step=1, model=old)
        calls, broken = _save_cut_at(run, cut, new, monkeypatch)
        assert not broken, broken
        if calls is None:
            break
        cut_names.append(calls[-1])
        loaded = load_checkpoint(run)
        expected = {1: old, 2: new}[loaded.step]
        assert all(torch.equal(a, b) for a, b in zip(loaded.model.state_dict().values(),
                                                     expected.state_dict().values()))
        if "os.rename" not in calls[:-1]:  # cut before the rename into place
            assert [p.name for p in checkpoint_dirs(run)] == ["ckpt-00000001"]
    # Every kind of operation was cut, the manifest (the last JSON) before the rename.
    assert calls is None and {"make_temp_dir", "_write_bytes", "_write_json", "_fsync_dir",
                              "os.rename"} <= set(cut_names)
    manifest = max(i for i, name in enumerate(cut_names) if name == "_write_json")
    assert manifest < cut_names.index("os.rename")


# --- a full disk, a reader racing a pruning writer, permissions -------------------------------

def _no_space_at(cut, monkeypatch):
    """Make the `cut`-th disk operation of a checkpoint write (a directory made, a file written,
    a directory fsynced) raise ENOSPC, as a full disk does; returns the list of calls made."""
    import errno

    import tinygpt.checkpoint as module

    calls = []

    def full(name, operation):
        def probed(*args, **kwargs):
            calls.append(name)
            if len(calls) == cut:
                raise OSError(errno.ENOSPC, "No space left on device")
            return operation(*args, **kwargs)
        return probed

    for name in ("make_temp_dir", "_write_bytes", "_fsync_dir"):
        monkeypatch.setattr(module, name, full(name, getattr(module, name)))
    return calls


def test_a_full_disk_at_any_write_says_so_and_keeps_the_previous_checkpoint(tmp_path,
                                                                            monkeypatch):
    """ENOSPC at each disk operation of the write in turn: one sentence naming the checkpoint and
    the full disk and saying the previous checkpoint is intact; no temporary left; checkpoint 1
    still loads unchanged."""
    from tinygpt.files import DiskFullError

    old, new = _model(0), _model(1)
    seen, after_rename = set(), 0
    for cut in range(1, 100):
        run = tmp_path / f"cut-{cut}"
        _save(run, step=1, model=old)
        with monkeypatch.context() as patch:
            calls = _no_space_at(cut, patch)
            try:
                _save(run, step=2, model=new)
            except DiskFullError as error:
                message = str(error)
            else:
                break
        seen.add(calls[-1])
        if (run / "ckpt-00000002").exists():  # only the last fsync, after the rename, failed
            assert message == (
                f"checkpoint '{run / 'ckpt-00000002'}' was written, but syncing '{run}' failed: "
                f"no space left on the device; the checkpoint is complete but may not survive a "
                f"power cut.")
            assert load_checkpoint(run).step == 2
            after_rename += 1
            continue
        assert message == (
            f"cannot write checkpoint '{run / 'ckpt-00000002'}': no space left on the device; "
            f"the partial copy was removed and the previous checkpoint "
            f"'{run / 'ckpt-00000001'}' is intact."), message
        assert sorted(p.name for p in run.iterdir()) == ["ckpt-00000001"]
        loaded = load_checkpoint(run)
        assert loaded.step == 1 and all(
            torch.equal(a, b) for a, b in zip(loaded.model.state_dict().values(),
                                              old.state_dict().values()))
    assert cut > 7 and seen == {"make_temp_dir", "_write_bytes", "_fsync_dir"} and after_rename == 1


def test_a_full_disk_at_the_first_save_says_no_earlier_checkpoint(tmp_path, monkeypatch):
    from tinygpt.files import DiskFullError

    _no_space_at(2, monkeypatch)
    with pytest.raises(DiskFullError, match=r"no space left on the device; the partial copy was "
                                            r"removed and no earlier checkpoint exists\.$"):
        _save(tmp_path, step=1)
    assert list(tmp_path.iterdir()) == []


def _prune_under_the_reader(run, monkeypatch, hook):
    """Patch `hook` of the checkpoint module so that, the first time it runs, a trainer saves
    checkpoint 2 and prunes checkpoint 1, which the reader has already chosen."""
    import tinygpt.checkpoint as module

    original, fired = getattr(module, hook), []

    def racing(*args, **kwargs):
        result = original(*args, **kwargs)
        if not fired:
            fired.append(True)
            monkeypatch.setattr(module, hook, original)
            _save(run, step=2, model=_model(2))  # keep=1: checkpoint 1 is deleted
            assert [p.name for p in checkpoint_dirs(run)] == ["ckpt-00000002"]
        return result

    monkeypatch.setattr(module, hook, racing)
    return fired


def test_a_checkpoint_pruned_after_it_was_verified_still_loads(tmp_path, monkeypatch):
    """The trainer deletes the checkpoint between the hash check and the model's construction:
    the model is built from the bytes that were verified, so the deletion cannot matter."""
    _save(tmp_path, step=1, model=_model(1))
    fired = _prune_under_the_reader(tmp_path, monkeypatch, "_read_verified")
    loaded = load_checkpoint(tmp_path)
    assert fired and loaded.step == 1 and not loaded.path.exists()
    assert all(torch.equal(a, b) for a, b in zip(loaded.model.state_dict().values(),
                                                 _model(1).state_dict().values()))


def test_a_checkpoint_pruned_while_it_is_read_sends_the_reader_to_the_newer_one(tmp_path,
                                                                               monkeypatch):
    """The trainer deletes the checkpoint after its manifest was read, before its files were:
    the reader finds the directory gone and loads the checkpoint that replaced it."""
    _save(tmp_path, step=1, model=_model(1))
    fired = _prune_under_the_reader(tmp_path, monkeypatch, "_read_bytes")
    loaded = load_checkpoint(tmp_path)
    assert fired and loaded.step == 2
    assert all(torch.equal(a, b) for a, b in zip(loaded.model.state_dict().values(),
                                                 _model(2).state_dict().values()))


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_checkpoint_permissions_follow_the_umask(tmp_path, umask):
    """Like every other file of a run: 0777 / 0666 less the umask, not mkdtemp's 0700."""
    previous = os.umask(umask)
    try:
        path = _save(tmp_path / "run", step=1)
    finally:
        os.umask(previous)
    assert os.stat(path).st_mode & 0o777 == 0o777 & ~umask
    for file in path.iterdir():
        assert os.stat(file).st_mode & 0o777 == 0o666 & ~umask, file.name


def test_a_manifest_that_is_not_an_object_is_refused_in_one_sentence(tmp_path):
    path = _save(tmp_path)
    (path / "manifest.json").write_text("[]")
    with pytest.raises(CheckpointError, match="manifest.json' is not a JSON object of file hashes"):
        load_checkpoint(tmp_path)
