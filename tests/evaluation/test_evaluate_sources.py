"""`speechllm-hf evaluate` with data-config entries that name one `datasets` source by `split` (and `dataset_config`):
a folder laid out as a Hub dataset repo, whose named split every partition reads; a split it lacks is refused before
anything is generated. Offline."""

import json
from pathlib import Path

import pytest
import yaml
from conftest import SOURCE_ROWS, hub_folder

import speechllm_hf.evaluation.runner as runner
from speechllm_hf.cli import main
from speechllm_hf.evaluation.data_config import load_data_config, resolve_split_path

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """A folder holding `hub`, laid out as a Hub dataset repo (train: 6 rows, validation: 2), and the configs."""
    root = tmp_path_factory.mktemp("eval_sources")
    hub_folder(root / "hub")
    return root


def write_config(path: Path, *entries: dict) -> Path:
    """A data config of ASR entries on `hub` (beside it), each `{name: settings}` overriding those defaults."""
    defaults = {"datapath": "hub", "task": "ASR", "languages": ["en"], "partitions": {"dev": {}}}
    items = [{name: {**defaults, **settings}} for entry in entries for name, settings in entry.items()]
    path.write_text(yaml.safe_dump({"DATA": items}, sort_keys=False))
    return path


def run_evaluate(config: Path, results_dir: Path) -> int:
    args = ["evaluate", "--preset", "tiny", "--data_config", str(config), "--results_dir", str(results_dir)]
    return main([*args, "--max_new_tokens", "2", "--batch_size", "2"])


def test_an_entry_reads_the_split_it_names(root, tmp_path) -> None:
    partitions = {"dev": {}, "first": {"amount": ":1"}}
    config = write_config(root / "validation.yaml", {"Hub": {"split": "validation", "partitions": partitions}})
    assert run_evaluate(config, tmp_path) == 0
    preds = json.loads((tmp_path / "validation_preds.json").read_text())["results"]["ASR"]["en"]
    scores = json.loads((tmp_path / "validation_scores.json").read_text())["results"]["ASR"]["en"]
    texts = [
        row["text"] for row in SOURCE_ROWS[6:]
    ]  # the validation split's; the default split (train) has other rows
    assert [record["reference"] for record in preds["Hub/dev"]] == texts
    assert [record["reference"] for record in preds["Hub/first"]] == texts[:1]
    assert all(isinstance(record["prediction"], str) for group in preds.values() for record in group)
    source = {"path": str(root / "hub"), "dataset_split": "validation", "split_rows": 2}
    assert {key: scores["Hub/dev"][key] for key in ("split", *source)} == {"split": "dev", **source}
    assert scores["Hub/first"]["num_scored"] == 1


def test_a_split_the_source_lacks_is_refused_before_generating(root, tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setattr(runner, "iter_generate", lambda *args, **kwargs: pytest.fail("generated before the check"))
    config = write_config(root / "bad.yaml", {"Good": {"split": "validation"}}, {"Hub": {"split": "test"}})
    assert run_evaluate(config, tmp_path / "results") == 2
    (line,) = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert line.startswith("speechllm-hf evaluate: error: Hub: ")
    assert "has no split 'test'; its splits are ['train', 'validation']" in line
    assert not (tmp_path / "results").exists()


def test_source_keys_are_checked_and_a_hub_id_stays_an_id(root) -> None:
    config = write_config(
        root / "ids.yaml",
        {"Id": {"datapath": "someone/speech-data", "dataset_config": "en", "split": "test"}},
        {"Folder": {"datapath": "someone/speech-data"}},
    )
    by_id, folder = load_data_config(config).entries
    assert (by_id.datapath, by_id.dataset_config, by_id.split) == ("someone/speech-data", "en", "test")
    assert resolve_split_path(by_id, "en", "dev") == "someone/speech-data"
    assert folder.datapath == root / "someone" / "speech-data"  # no split or config: a path, as before

    with pytest.raises(ValueError, match=r"DATA/Hub: split must be a name; got 2019 \(quote it"):
        load_data_config(write_config(root / "number.yaml", {"Hub": {"split": 2019}}))
    (hub,) = load_data_config(write_config(root / "no_split.yaml", {"Hub": {}})).entries
    with pytest.raises(ValueError, match="give the entry `split` \\(and `dataset_config`\\)"):
        resolve_split_path(hub, "en", "dev")
