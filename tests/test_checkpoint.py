"""
checkpoint.py: the file format train.py writes and sample.py reads, checked against what it promises.
- Naming and finding: ckpt_<step>.pt newest first; temp files of a killed save never count.
- Loading: a folder falls back past a truncated newest file (with a warning); a file named explicitly
  that is corrupt or missing is an error naming it; prefixes of wrapped modules ("module.", "_orig_mod.")
  are stripped and the weights load strictly; EMA or raw weights as asked.
- Saving: atomic (a failing write leaves the previous checkpoint byte-identical and no temp file), only
  the newest `keep` kept; the result loads with weights_only=True.
- training_state / restore_training_state: a second route to the same numbers -- a fresh model, EMA and
  optimizer restored from the dict equal the originals tensor for tensor.
- build_model: unknown model names and unknown config fields are refused in one line.
- find_latest_run: the run whose newest checkpoint was written last.
"""
import dataclasses
import os

import pytest
import torch

import checkpoint as C
from conftest import write_checkpoint
from schedules import get_schedule
from unet import UNet, preset_config


def test_folder_falls_back_past_a_corrupt_file_and_named_files_fail(tmp_path, capsys):
    run = tmp_path / "runs" / "unet-8"
    raw = write_checkpoint(run, 5, wrap=lambda sd: {"module._orig_mod." + k: v for k, v in sd.items()})
    (run / "ckpt_00000010.pt").write_bytes(b"PK\x03\x04 truncated")          # a newer, corrupt file
    (run / "ckpt_00000012.pt.tmp123").write_bytes(b"partial save")           # never a candidate
    assert [p.name for p in C.find_checkpoints(run)] == ["ckpt_00000010.pt", "ckpt_00000005.pt"]
    model, ckpt = C.load_model(run, weights="ema")                            # folder: falls back to 5
    assert ckpt["step"] == 5 and "ckpt_00000010.pt" in capsys.readouterr().err
    for k, v in raw.state_dict().items():                                     # EMA = raw + 1 by construction
        torch.testing.assert_close(model.state_dict()[k], v + 1, rtol=0, atol=0)
    model_raw, _ = C.load_model(run / "ckpt_00000005.pt", weights="raw")
    torch.testing.assert_close(model_raw.state_dict(), raw.state_dict(), rtol=0, atol=0)
    assert not model.training and isinstance(model, UNet)
    with pytest.raises(C.CheckpointError, match="ckpt_00000010.pt.*corrupt"):
        C.load_checkpoint(run / "ckpt_00000010.pt")                           # named explicitly: error
    with pytest.raises(C.CheckpointError, match="nope.pt"):
        C.load_checkpoint(run / "nope.pt")
    with pytest.raises(C.CheckpointError, match="no checkpoints"):
        C.load_checkpoint(tmp_path)
    assert C.strip_prefixes({"_orig_mod.module.a.b": 1, "c": 2}) == {"a.b": 1, "c": 2}


def test_find_latest_run(tmp_path):
    write_checkpoint(tmp_path / "runs" / "old", 3)
    write_checkpoint(tmp_path / "runs" / "newer", 1)
    os.utime(C.find_checkpoints(tmp_path / "runs" / "old")[0], (1, 1))      # make "newer" the latest
    assert C.find_latest_run(tmp_path / "runs").name == "newer"
    with pytest.raises(C.CheckpointError, match="python train.py"):
        C.find_latest_run(tmp_path / "empty")


def test_save_keeps_the_newest_and_loads_weights_only(tmp_path):
    for step in (1, 2, 3):
        C.save_checkpoint(tmp_path, {"step": step, "w": torch.full((3,), float(step))}, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt_00000002.pt", "ckpt_00000003.pt"]
    assert torch.equal(torch.load(tmp_path / "ckpt_00000003.pt", weights_only=True)["w"], torch.full((3,), 3.0))


def test_failed_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    good = C.save_checkpoint(tmp_path, {"step": 1, "w": torch.ones(3)})
    before = good.read_bytes()

    def disk_full(obj, f):
        f.write(b"partial")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        C.save_checkpoint(tmp_path, {"step": 2, "w": torch.zeros(3)})
    assert sorted(p.name for p in tmp_path.iterdir()) == [good.name]          # no temp file, no step 2
    assert good.read_bytes() == before


def test_training_state_round_trip(tmp_path):
    torch.manual_seed(0)
    model = UNet(preset_config("tiny", res=8))
    ema = UNet(model.config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(2, 3, 8, 8), torch.zeros(2)).square().mean().backward()
    optimizer.step()                                                         # non-trivial optimizer state
    state = C.training_state(step=7, model_name="unet", model=model, ema=ema, optimizer=optimizer,
                             schedule=get_schedule("cosine", 8), config=model.config, class_names=None,
                             data_state={"epoch": 1}, rng_state={})
    C.save_checkpoint(tmp_path, state)
    ckpt = C.load_checkpoint(tmp_path)
    fresh, fresh_ema = UNet(model.config), UNet(model.config)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    C.restore_training_state(ckpt, fresh, fresh_ema, fresh_opt)
    torch.testing.assert_close(fresh.state_dict(), model.state_dict(), rtol=0, atol=0)
    torch.testing.assert_close(fresh_ema.state_dict(), ema.state_dict(), rtol=0, atol=0)
    for p, q in zip(model.parameters(), fresh.parameters()):
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(optimizer.state[p][key], fresh_opt.state[q][key])
    assert ckpt["schedule"] == dataclasses.asdict(get_schedule("cosine", 8)) and ckpt["step"] == 7
    rebuilt = C.build_model(ckpt["model_name"], ckpt["model_config"])
    assert rebuilt.config == model.config                                    # lists come back as tuples


def test_build_model_and_load_refuse_foreign_input(tmp_path):
    cfg = dataclasses.asdict(preset_config("tiny", res=8))
    with pytest.raises(C.CheckpointError, match="unknown model_name 'gan'"):
        C.build_model("gan", cfg)
    with pytest.raises(C.CheckpointError, match=r"\['wings'\]"):
        C.build_model("unet", {**cfg, "wings": 2})
    torch.save({"step": 1}, tmp_path / "ckpt_00000001.pt")                  # a torch file, not ours
    with pytest.raises(C.CheckpointError, match="not a simple-diffusion checkpoint"):
        C.load_checkpoint(tmp_path / "ckpt_00000001.pt")


def test_background_writer_snapshots_and_reports_failures_later(tmp_path, monkeypatch):
    w = torch.ones(1000)
    writer = C.BackgroundWriter()
    writer.submit(tmp_path, {"step": 1, "w": w})
    w.add_(1)                                          # training goes on while the file is written
    writer.wait()
    saved = tmp_path / "ckpt_00000001.pt"
    assert torch.equal(torch.load(saved, weights_only=True)["w"], torch.ones(1000))   # the snapshot, not w now
    before = saved.read_bytes()

    def disk_full(obj, f):
        f.write(b"partial")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(torch, "save", disk_full)
    writer.submit(tmp_path, {"step": 2, "w": w})       # returns at once; the failure comes with the next call
    with pytest.raises(OSError, match="No space left"):
        writer.wait()
    assert sorted(p.name for p in tmp_path.iterdir()) == [saved.name] and saved.read_bytes() == before
    writer.wait()                                      # reported once, then the writer is usable again
