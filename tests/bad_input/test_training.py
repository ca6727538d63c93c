"""Bad input to training (`SpeechLlmTrainer.train`, `speechllm-hf train`): a second run on one output folder, a resume
whose run-defining arguments changed, an output folder that is a file. Each case checks the message and that nothing
valid was lost: the first run's lock and checkpoints are left as they were. docs/reliability.md lists the cases."""

import json
import logging
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

from speechllm_hf.quickstart.corpus import load_split
from speechllm_hf.training.checkpoints import incomplete_reason, mark_complete
from speechllm_hf.training.run_lock import LOCK_FILE
from speechllm_hf.training.run_record import RUN_RECORD

HOLD_LOCK = """
import sys, time
from speechllm_hf.training.run_lock import RunLock
held = RunLock(sys.argv[1]).__enter__()  # kept: the lock lives as long as its open file
print("locked", flush=True)
time.sleep(120)
"""


def snapshot(folder):
    """Every file under `folder` with its bytes."""
    return {
        os.path.relpath(os.path.join(root, name), folder): open(os.path.join(root, name), "rb").read()
        for root, _, names in os.walk(folder)
        for name in names
    }


@pytest.fixture
def other_run(tmp_path):
    """A live process of another run holding the lock of `tmp_path / 'run'`."""
    output_dir = tmp_path / "run"
    process = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(output_dir)], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "locked"
    yield output_dir, process
    process.kill()
    process.wait()


def test_a_second_run_on_a_locked_output_dir_is_refused_and_a_killed_ones_lock_is_taken_over(
    other_run, make_trainer, caplog
):
    output_dir, process = other_run
    before = snapshot(output_dir)
    with pytest.raises(RuntimeError, match=rf"in use by another training run \(.*\"pid\": {process.pid}"):
        make_trainer(output_dir).train()
    assert snapshot(output_dir) == before  # nothing written beside the other run's files

    process.send_signal(signal.SIGKILL)
    process.wait()
    with caplog.at_level(logging.WARNING, logger="speechllm_hf.training.run_lock"):
        trainer = make_trainer(output_dir, max_steps=2)
        trainer.train()
    assert 'names a run that ended without releasing it ({"host"' in caplog.text and str(process.pid) in caplog.text
    assert trainer.state.global_step == 2 and incomplete_reason(output_dir / "checkpoint-2") is None
    assert (output_dir / LOCK_FILE).read_text() == ""  # released: a clean exit empties it


def test_a_run_after_a_finished_one_takes_the_lock_without_a_warning(tmp_path, make_trainer, caplog):
    make_trainer(tmp_path, max_steps=1).train()
    with caplog.at_level(logging.WARNING, logger="speechllm_hf.training.run_lock"):
        make_trainer(tmp_path, max_steps=2).train(resume_from_checkpoint=True)
    assert "run_lock" not in caplog.text


@pytest.mark.parametrize(
    "change, shown, changed",
    [
        (dict(learning_rate=5e-4), "learning_rate: 0.001 -> 0.0005", ["learning_rate"]),
        (dict(per_device_train_batch_size=4), "per_device_train_batch_size: 2 -> 4", ["per_device_train_batch_size"]),
        (dict(projector_type="cnn"), 'projector_type: "mlp" -> "cnn"', ["projector_config", "projector_type"]),
        (dict(prompt_file="blsp"), "prompts: {", ["prompts"]),
    ],
    ids=["learning_rate", "batch_size", "projector_type", "instructions"],
)
def test_a_resume_with_changed_run_arguments_is_refused_naming_each_change(
    tmp_path, make_trainer, change, shown, changed
):
    make_trainer(tmp_path, max_steps=2).train()
    recorded = json.loads((tmp_path / "checkpoint-2" / RUN_RECORD).read_text())
    assert recorded["learning_rate"] == 1e-3 and recorded["projector_type"] == "mlp"
    before = snapshot(tmp_path)
    with pytest.raises(ValueError, match=r"Cannot resume from .*checkpoint-2: this run differs") as refused:
        make_trainer(tmp_path, max_steps=4, **change).train(resume_from_checkpoint=True)
    assert shown in str(refused.value) and "--model <checkpoint> with a new --output_dir" in str(refused.value)
    named = [line.split(":")[0].strip() for line in str(refused.value).splitlines() if line.startswith("  ")]
    assert named == changed  # what changed, and nothing else
    assert snapshot(tmp_path) == before


def test_a_resume_that_only_trains_longer_goes_on(tmp_path, make_trainer):
    make_trainer(tmp_path, max_steps=2).train()
    trainer = make_trainer(tmp_path, max_steps=3, logging_steps=1)
    trainer.train(resume_from_checkpoint=True)
    assert trainer.state.global_step == 3


def test_a_checkpoint_without_a_run_record_resumes_with_a_warning(tmp_path, make_trainer, caplog):
    make_trainer(tmp_path, max_steps=2).train()
    (tmp_path / "checkpoint-2" / RUN_RECORD).unlink()
    mark_complete(tmp_path / "checkpoint-2")  # as written before run records
    trainer = make_trainer(tmp_path, max_steps=3, learning_rate=5e-4)
    with caplog.at_level(logging.WARNING, logger="speechllm_hf.training.run_record"):
        trainer.train(resume_from_checkpoint=True)
    assert f"checkpoint-2 has no {RUN_RECORD}: the run's arguments cannot be compared with it" in caplog.text
    assert trainer.state.global_step == 3


@pytest.mark.parametrize("where", ["is", "under"])
def test_an_output_dir_that_is_a_file_is_refused_before_training(tmp_path, make_trainer, where):
    file = tmp_path / "notes.txt"
    file.write_text("keep me")
    output_dir = file if where == "is" else file / "run"
    message = "is a file" if where == "is" else f"lies under {file}, which is a file"
    with pytest.raises(ValueError, match=rf"output_dir {output_dir} {message}, not a folder"):
        make_trainer(output_dir).train()
    assert file.read_text() == "keep me"


def cli_train(manifest, output_dir, *extra):
    from speechllm_hf.cli import main

    argv = ["train", "--train_manifest", str(manifest), "--max_steps", "1", "--use_cpu", "--report_to", "none"]
    return main([*argv, "--save_strategy", "no", "--output_dir", str(output_dir), *extra])


def test_cli_train_drops_clips_too_short_for_the_encoder(tmp_path, caplog):
    """They passed `train`'s validation and stopped training at their batch (issue 18 item 5)."""
    rows = load_split("dev")[:3]
    sf.write(tmp_path / "blip.wav", np.zeros(200, dtype=np.float32), 16000)  # 12.5 ms: no HuBERT frame
    rows[1]["audio"] = str(tmp_path / "blip.wav")
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    with caplog.at_level(logging.INFO, logger="speechllm_hf.commands.train"):
        assert cli_train(tmp_path / "m.jsonl", tmp_path / "run") == 0
    report = next(json.loads(r.getMessage().split(": ", 1)[1]) for r in caplog.records if "m.jsonl" in r.getMessage())
    assert report["kept"] == 2 and report["dropped"]["too_short_for_encoder"] == 1


def test_cli_train_refusals_are_a_sentence_and_exit_status_2(other_run, tmp_path, capsys):
    rows = load_split("dev")[:2]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    output_dir, process = other_run
    assert cli_train(tmp_path / "m.jsonl", output_dir) == 2
    error = capsys.readouterr().err
    assert "\nspeechllm-hf train: error: " in error and f'"pid": {process.pid}' in error
    assert "Traceback" not in error
    (tmp_path / "file").write_text("")
    assert cli_train(tmp_path / "m.jsonl", tmp_path / "file") == 2
    assert "is a file, not a folder" in capsys.readouterr().err
