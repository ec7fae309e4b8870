"""LoRA adapters through peft on the hand-written model's linear layers."""

import os
from pathlib import Path

import pytest
import torch

from tinygpt import ModelConfig, TinyDecoderModel
from tinygpt.lora import (
    LORA_TARGETS,
    LoraSettings,
    add_lora,
    finetune,
    load_lora,
    lora_parameters,
    merge_lora,
    save_lora,
)


def _base(seed=0):
    torch.manual_seed(seed)
    return TinyDecoderModel(ModelConfig.preset("seed", max_seq=16)).eval()


def _corpus(n=600, seed=1):
    # A learnable stream: a repeating pattern with a little noise.
    g = torch.Generator().manual_seed(seed)
    ids = torch.arange(n) % 7
    flip = torch.rand(n, generator=g) < 0.05
    return torch.where(flip, torch.randint(0, 40, (n,), generator=g), ids)


def _idx(seed=2):
    return torch.randint(0, 40, (3, 16), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def trained():
    base = _base()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    adapted = add_lora(base, LoraSettings(rank=4, targets=LORA_TARGETS))
    initial = {k: v.clone() for k, v in adapted.state_dict().items()}
    losses = finetune(adapted, _corpus(), steps=25, batch_size=8, lr=1e-2)
    return base, before, adapted, initial, losses


def test_adapted_model_equals_the_base_at_step_zero():
    base = _base()
    idx = _idx()
    adapted = add_lora(base, LoraSettings(rank=8, targets=LORA_TARGETS))
    assert len(lora_parameters(adapted)) == 2 * (2 * 4 + 1)  # A and B per adapted Linear
    assert torch.equal(adapted(idx), base(idx))


def test_every_target_is_adapted_and_nothing_else_trains():
    adapted = add_lora(_base(), LoraSettings(rank=2, targets=("mlp.fc_in", "lm_head")))
    trainable = sorted(n for n, p in adapted.named_parameters() if p.requires_grad)
    assert trainable and all("lora_" in n for n in trainable)
    assert any(".mlp.fc_in.lora_A" in n for n in trainable)
    assert any(".lm_head.lora_B" in n for n in trainable)
    assert not any("in_proj" in n or "mlp.fc_out" in n for n in trainable)


def test_finetuning_changes_only_adapter_parameters(trained):
    _, _, adapted, initial, losses = trained
    after = adapted.state_dict()
    changed = {k for k in initial if not torch.equal(initial[k], after[k])}
    assert changed, "training changed nothing"
    assert all("lora_" in k for k in changed)
    assert any("lora_B" in k for k in changed)
    assert losses[-1] < losses[0]


def test_base_weights_are_byte_identical_after_finetuning(trained):
    base, before, *_ = trained
    after = base.state_dict()
    assert before.keys() == after.keys()
    for key in before:
        assert before[key].numpy().tobytes() == after[key].numpy().tobytes(), key


def test_merged_model_equals_adapted_model(trained):
    _, _, adapted, _, _ = trained
    idx = _idx()
    merged = merge_lora(adapted)
    assert isinstance(merged, TinyDecoderModel)
    with torch.no_grad():
        expected = adapted(idx)
        torch.testing.assert_close(merged(idx), expected, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(expected, _base()(idx), atol=1e-3)
        assert torch.equal(adapted(idx), expected)  # merging left the adapted model intact


def test_adapters_save_as_safetensors_and_load_back(trained, tmp_path):
    base, _, adapted, _, _ = trained
    directory = save_lora(adapted, tmp_path / "lora")
    assert (directory / "adapter_model.safetensors").is_file()
    loaded = load_lora(base, directory)
    idx = _idx()
    with torch.no_grad():
        assert torch.equal(loaded(idx), adapted(idx))


def test_bad_settings_and_paths_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown LoRA target 'qkv'"):
        LoraSettings(targets=("qkv",))
    with pytest.raises(ValueError, match="rank must be a positive integer, got 0"):
        LoraSettings(rank=0)
    with pytest.raises(FileNotFoundError, match="no adapter_model.safetensors"):
        load_lora(_base(), tmp_path)
    with pytest.raises(ValueError, match="the corpus has 5 tokens"):
        finetune(add_lora(_base(), LoraSettings()), torch.arange(5), steps=1)


def test_reference_with_hand_applied_adapters_equals_the_adapted_model(trained):
    from reference import ReferenceDecoderModel, copy_weights
    from reference.lora import add_lora_to_reference

    base, _, adapted, _, _ = trained
    reference = ReferenceDecoderModel(base.config).eval()
    copy_weights(base, reference)
    idx = _idx()
    with torch.no_grad():
        assert not torch.allclose(reference(idx), adapted(idx), atol=1e-3)  # the adapters matter
        changed = add_lora_to_reference(reference, adapted)
        assert len(changed) == 2 * 4 + 1
        assert "blocks.0.attention.in_proj_weight" in changed
        torch.testing.assert_close(reference(idx), adapted(idx), rtol=1e-5, atol=1e-5)


# --- a non-finite loss, atomic saves, bad settings, a stop request, locks ---------------------

def _tree(directory):
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_a_non_finite_loss_stops_before_the_adapters_are_written(trained, tmp_path):
    """Adapters that load are never replaced by NaN ones: fine-tuning at lr 1e12 stops on the
    first non-finite loss, and the adapters saved before stay byte for byte."""
    from tinygpt.train import NonFiniteLossError

    base, _, adapted, _, _ = trained
    good = _tree(save_lora(adapted, tmp_path / "lora"))
    exploding = add_lora(base, LoraSettings(rank=4))
    with pytest.raises(NonFiniteLossError, match=r"loss became (nan|inf) at fine-tuning step \d+; "
                                                  r"stopped without writing adapters"):
        finetune(exploding, _corpus(), steps=50, batch_size=4, lr=1e12)
    assert _tree(tmp_path / "lora") == good


def test_non_finite_adapters_are_refused(trained, tmp_path):
    from tinygpt.train import NonFiniteLossError

    base, _, adapted, _, _ = trained
    good = _tree(save_lora(adapted, tmp_path / "lora"))
    broken = add_lora(base, LoraSettings(rank=4))
    with torch.no_grad():
        next(iter(lora_parameters(broken).values()))[0, 0] = float("nan")
    with pytest.raises(NonFiniteLossError, match="holds non-finite values; refusing to write it"):
        save_lora(broken, tmp_path / "lora")
    assert _tree(tmp_path / "lora") == good


def test_a_save_cut_short_leaves_the_old_adapters_whole(trained, tmp_path, monkeypatch):
    """A crash (here: a full disk) in the middle of writing new adapters leaves the old
    directory as it was and no temporary behind."""
    import errno

    from peft import PeftModel

    from tinygpt.files import DiskFullError

    base, _, adapted, _, _ = trained
    good = _tree(save_lora(adapted, tmp_path / "lora"))
    real = PeftModel.save_pretrained

    def half_then_full(self, directory, **kwargs):
        real(self, directory, **kwargs)
        (Path(directory) / "adapter_model.safetensors").write_bytes(b"torn")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(PeftModel, "save_pretrained", half_then_full)
    with pytest.raises(DiskFullError, match=r"cannot write adapters to '.*lora': no space left on "
                                            r"the device; the directory was left as it was\."):
        save_lora(add_lora(base, LoraSettings(rank=4)), tmp_path / "lora")
    assert _tree(tmp_path / "lora") == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora"]


@pytest.mark.parametrize("kwargs, message", [
    ({"batch_size": 0}, "batch_size must be an integer >= 1, got 0"),
    ({"steps": -1}, "steps must be an integer >= 0, got -1"),
    ({"lr": float("inf")}, "lr must be a finite number > 0, got inf"),
    ({"lr": float("nan")}, "lr must be a finite number > 0, got nan"),
    ({"lr": 0.0}, "lr must be a finite number > 0, got 0.0"),
])
def test_bad_finetune_settings_are_one_sentence(kwargs, message):
    with pytest.raises(ValueError, match=message):
        finetune(add_lora(_base(), LoraSettings()), _corpus(), **{"steps": 1, **kwargs})


def test_a_stop_request_ends_finetuning_after_the_step(trained):
    asked = []
    losses = finetune(add_lora(trained[0], LoraSettings(rank=2)), _corpus(), steps=50,
                      batch_size=2, should_stop=lambda: asked.append(1) or len(asked) == 3)
    assert len(losses) == 3


def test_adapter_permissions_follow_the_umask(trained, tmp_path):
    previous = os.umask(0o022)
    try:
        directory = save_lora(trained[2], tmp_path / "lora")
    finally:
        os.umask(previous)
    assert os.stat(directory).st_mode & 0o777 == 0o755
    assert {os.stat(p).st_mode & 0o777 for p in directory.iterdir()} == {0o644}


def test_two_finetunings_into_one_directory_are_refused(tmp_path):
    from tinygpt.files import LockedError
    from tinygpt.lora import adapter_lock

    with adapter_lock(tmp_path / "lora"):
        with pytest.raises(LockedError, match=rf"adapter directory '{tmp_path / 'lora'}' is in use "
                                              rf"by process {os.getpid()} "):
            with adapter_lock(tmp_path / "lora"):
                pass
    with adapter_lock(tmp_path / "lora"):  # released
        pass
