import argparse
import dataclasses

import pytest

from nanoseek.train.config import TrainConfig, add_arguments, from_args


def parser():
    p = argparse.ArgumentParser()
    add_arguments(p)
    return p


def test_every_field_has_a_flag_and_flags_parse_to_the_right_types():
    p = parser()
    flags = {a.dest for a in p._actions}
    assert {f.name for f in dataclasses.fields(TrainConfig)} <= flags
    cfg = from_args(p.parse_args(["--model-config", "m.json", "--data", "d", "--out", "o", "--batch-size", "3",
                                  "--lr", "1e-3", "--no-progress", "--activation-checkpointing",
                                  "--schedule", "wsd"]))
    assert (cfg.batch_size, cfg.lr, cfg.progress, cfg.activation_checkpointing, cfg.schedule) == \
        (3, 1e-3, False, True, "wsd")
    assert cfg.seq_len == TrainConfig().seq_len
    with pytest.raises(SystemExit):
        p.parse_args(["--schedule", "linear"])
    with pytest.raises(ValueError, match="--data is required"):
        from_args(p.parse_args(["--model-config", "m.json", "--out", "o"]))


def test_resume_keeps_the_saved_settings_and_applies_given_flags(tmp_path):
    TrainConfig(model_config="m.json", data="d", out=str(tmp_path), lr=0.01, max_steps=10).save(tmp_path)
    cfg = from_args(parser().parse_args(["--out", str(tmp_path), "--resume", "--max-steps", "20"]))
    assert (cfg.model_config, cfg.lr, cfg.max_steps, cfg.resume) == ("m.json", 0.01, 20, True)
    saved = TrainConfig.load(tmp_path)
    assert cfg.resume_differences(saved) == []
    assert cfg.replace(lr=0.02).resume_differences(saved) == ["lr: saved 0.01, now 0.02"]


def test_resume_of_a_folder_without_a_run_says_so(tmp_path, capsys):
    """Issue 12 item 10: not "--model-config is required"."""
    from nanoseek import cli

    with pytest.raises(ValueError, match=f"--resume: no run/checkpoint in {tmp_path}"):
        from_args(parser().parse_args(["--out", str(tmp_path), "--resume"]))
    assert cli.main(["train", "--out", str(tmp_path / "nothing"), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "no run/checkpoint in" in err and "nothing" in err and "required" not in err


def test_resume_compares_paths_resolved_and_ignores_where_the_run_is(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "d").mkdir()
    saved = TrainConfig(model_config="m.json", data=str(tmp_path / "d"), out="/somewhere/else/run")
    now = saved.replace(data="./d/", model_config=str(tmp_path / "m.json"), out="copy/")
    assert now.resume_differences(saved) == []
    assert now.replace(data="other").resume_differences(saved) == [f"data: saved {str(tmp_path / 'd')!r}, now 'other'"]
    saved.save(tmp_path)
    assert TrainConfig.load(tmp_path).out == str(tmp_path)  # a loaded run is where its folder is


@pytest.mark.parametrize("change, message", [
    (dict(batch_size=0), "batch_size=0 must be >= 1"),
    (dict(warmup_steps=50, max_steps=10), "warmup_steps=50 exceeds max_steps=10"),
    (dict(lr=-1.0), "lr=-1.0 must be > 0"),
    (dict(min_lr_ratio=2.0), "min_lr_ratio=2.0"),
    (dict(mtp_depth=-2), "mtp_depth=-2"),
    (dict(data=""), "data is required"),
])
def test_validate_names_the_bad_value(change, message):
    cfg = TrainConfig(model_config="m", data="d", out="o", warmup_steps=0).replace(**change)
    with pytest.raises(ValueError, match=message):
        cfg.validate()


def test_load_rejects_unknown_fields_and_bad_json(tmp_path):
    (tmp_path / "train_config.json").write_text('{"model_config": "m", "bogus": 1}')
    with pytest.raises(ValueError, match="bogus"):
        TrainConfig.load(tmp_path)
    (tmp_path / "train_config.json").write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        TrainConfig.load(tmp_path)
