"""`speechllm-hf evaluate`: YAML data configs, split slicing, duration filters, grouping and scores."""

import json
import sys
from pathlib import Path

import datasets
import pytest
import torch
import yaml

from speechllm_hf.cli import main
from speechllm_hf.data.audio import load_audio
from speechllm_hf.evaluation import metrics
from speechllm_hf.evaluation.data_config import (
    DatasetEntry,
    Partition,
    language_fields,
    load_data_config,
    resolve_split_path,
    slice_indices,
)
from speechllm_hf.evaluation.runner import SKIP_REASONS
from speechllm_hf.quickstart.corpus import load_split, manifest_path

MAX_DURATION = 2.0  # seconds; several dev clips are longer


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tiny model gains nothing from intra-op threads, which oversubscribe the cores under `pytest -n 2`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def mustc_rows(clips: list[dict], target: str) -> dict:
    """MuST-C-like columns: audio {array, sampling_rate}, duration, sentence, translation."""
    arrays = [load_audio(c["audio"]) for c in clips]
    return {
        "audio": [{"array": a.tolist(), "sampling_rate": 16000} for a in arrays],
        "duration": [len(a) / 16000 for a in arrays],
        "sentence": [c["text"] for c in clips],
        "translation": [f"{target}: {c['text']}" for c in clips],
    }


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """MuST-C-like en-de (a parquet file per split) and en-fr (a folder of parquet files per split) test sets and a
    Spoken-SQuAD-like dev set (audio as {bytes, path}) built from the shipped corpus, and a data config over them."""
    root = tmp_path_factory.mktemp("eval_data")
    clips = load_split("dev")[:8]
    de = mustc_rows(clips, "de")
    de["translation"][1] = None  # no reference: skipped as missing_fields
    (root / "mustc" / "en-de").mkdir(parents=True)
    datasets.Dataset.from_dict(de).to_parquet(root / "mustc" / "en-de" / "tst-COMMON.parquet")
    (root / "mustc" / "en-fr" / "tst-COMMON").mkdir(parents=True)
    datasets.Dataset.from_dict(mustc_rows(clips[:6], "fr")).to_parquet(
        root / "mustc" / "en-fr" / "tst-COMMON" / "part-0.parquet"
    )
    audio = [{"bytes": Path(c["audio"]).read_bytes(), "path": Path(c["audio"]).name} for c in clips]
    audio[5] = {"bytes": b"not audio at all", "path": "broken.ogg"}  # unusable: skipped as unusable_audio
    squad = {
        "audio": audio,
        "duration": [c["duration"] for c in clips],
        "question": [f"How many words are in sentence {i}?" for i in range(len(clips))],
        "answer": [[c["text"].split()[-1], c["text"]] for c in clips],
    }
    (root / "squad").mkdir()
    datasets.Dataset.from_dict(squad).to_parquet(root / "squad" / "dev.parquet")
    config = {
        "DATA": [
            {
                "MuST-C": {
                    "datapath": "mustc",
                    "task": "ST",
                    "languages": ["en-de", "en-fr"],
                    "partitions": {
                        "tst-COMMON": {
                            "amount": ":50%",
                            "min_duration": 0.1,
                            "max_duration": MAX_DURATION,
                            "destination": "test",
                        },
                        "train": {"amount": ":100%", "destination": "train"},
                    },
                }
            },
            {
                "MuST-C-ASR": {
                    "datapath": "mustc",
                    "task": "ASR",
                    "languages": ["en-de"],
                    "partitions": {"tst-COMMON": {"amount": "2:7", "max_duration": MAX_DURATION}},
                }
            },
            {
                "Spoken-SQuAD": {
                    "datapath": "${SQUAD_HOME}",
                    "task": "SQA",
                    "languages": "en",
                    "partitions": {"dev": {"max_duration": MAX_DURATION}},
                }
            },
            {  # a jsonl manifest with audio paths (relative to it) and `text` transcripts
                "Corpus": {
                    "datapath": str(manifest_path("dev")),
                    "task": "ASR",
                    "languages": ["en"],
                    "partitions": {"dev": {"amount": ":3"}},
                }
            },
        ]
    }
    (root / "cfg.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return root, clips


@pytest.fixture(scope="module")
def results(data, tmp_path_factory):
    root, _ = data
    results_dir = tmp_path_factory.mktemp("results")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SQUAD_HOME", str(root / "squad"))  # the config's datapath is ${SQUAD_HOME}
        args = ["evaluate", "--preset", "tiny", "--projector_type", "cnn", "--data_config", str(root / "cfg.yaml")]
        assert main([*args, "--results_dir", str(results_dir), "--max_new_tokens", "12", "--batch_size", "3"]) == 0
    preds = json.loads((results_dir / "cfg_preds.json").read_text())
    scores = json.loads((results_dir / "cfg_scores.json").read_text())
    return preds["results"], scores


def test_results_are_grouped_by_task_language_and_split(results):
    preds, scores = results
    expected = {
        "ST": {"en-de": ["MuST-C/tst-COMMON"], "en-fr": ["MuST-C/tst-COMMON"]},
        "ASR": {"en-de": ["MuST-C-ASR/tst-COMMON"], "en": ["Corpus/dev"]},
        "SQA": {"en": ["Spoken-SQuAD/dev"]},
    }
    for content in (preds, scores["results"]):
        assert {task: {lang: list(groups) for lang, groups in langs.items()} for task, langs in content.items()} == (
            expected
        )
    assert scores["not_evaluated"] == [
        {"dataset": "MuST-C", "task": "ST", "language": lang, "split": "train", "destination": "train"}
        for lang in ("en-de", "en-fr")
    ]
    assert scores["generation"] == {
        "max_new_tokens": 12,
        "do_sample": False,
        "num_beams": 1,
        "stop_at_newline": True,
        "batch_size": 3,
    }


def test_slices_and_skipped_rows_are_counted(results, data):
    preds, scores = results
    _, clips = data
    durations = [c["duration"] for c in clips]
    slices = {  # ":50%" of 8 and of 6 rows, "2:7", all 8
        ("ST", "en-de"): range(0, 4),
        ("ST", "en-fr"): range(0, 3),
        ("ASR", "en-de"): range(2, 7),
        ("SQA", "en"): range(0, 8),
    }
    for (task, language), rows in slices.items():
        (group,) = scores["results"][task][language].values()
        (records,) = preds[task][language].values()
        assert [r["index"] for r in records] == list(rows)
        too_long = sum(1 for i in rows if durations[i] > MAX_DURATION)
        assert too_long > 0  # the filter is exercised in every group
        assert group["skipped"]["too_long"] == too_long
        counted = {reason: sum(1 for r in records if r.get("skipped") == reason) for reason in SKIP_REASONS}
        assert group["skipped"] == counted
        assert group["num_rows"] == len(records) == group["num_scored"] + sum(counted.values())
    corpus = preds["ASR"]["en"]["Corpus/dev"]
    assert [(r["id"], r["reference"]) for r in corpus] == [(c["id"], c["text"]) for c in clips[:3]]
    de = preds["ST"]["en-de"]["MuST-C/tst-COMMON"]
    assert de[1]["skipped"] == "missing_fields" and "prediction" not in de[1]
    squad = preds["SQA"]["en"]["Spoken-SQuAD/dev"]
    assert squad[5]["skipped"] == "unusable_audio" and squad[5]["prediction"] is None and squad[5]["error"]
    assert all(
        r["prediction"] is not None
        for group in preds.values()
        for lang in group.values()
        for records in lang.values()
        for r in records
        if "skipped" not in r
    )


def test_scores_equal_the_metrics_on_the_preds_file(results):
    preds, scores = results
    for task, languages in preds.items():
        for language, groups in languages.items():
            for name, records in groups.items():
                scored = [r for r in records if "skipped" not in r]
                refs, hyps = [r["reference"] for r in scored], [r["prediction"] for r in scored]
                got = scores["results"][task][language][name]
                assert got["num_scored"] == len(scored) > 0
                if task == "ASR":
                    assert got["mean_utterance_wer"] == metrics.mean_utterance_wer(refs, hyps)
                    assert got["corpus_wer"] == metrics.corpus_wer(refs, hyps)
                elif task == "ST":
                    assert got["bleu"] == metrics.bleu(refs, hyps) and got["chrf"] == metrics.chrf(refs, hyps)
                    assert got["bleu_signature"].startswith("nrefs:1")
                    assert all(r["source"] for r in scored)
                else:
                    assert all(isinstance(r["reference"], list) and r["question"] for r in scored)
                    em_f1 = metrics.squad_em_f1(refs, hyps)
                    assert (got["exact_match"], got["f1"]) == (em_f1["exact_match"], em_f1["f1"])
                    assert all("\n" not in r["prediction"] for r in scored)  # stopped at a newline


@pytest.mark.parametrize("amount", [":50%", ":10%", "10:20", ":5", "-30%:", "20%:70%", "3:"])
def test_slicing_follows_datasets_split_semantics(amount, tmp_path):
    path = tmp_path / "rows.parquet"
    datasets.Dataset.from_dict({"i": list(range(13))}).to_parquet(path)
    reference = datasets.load_dataset(
        "parquet", data_files=str(path), split=f"train[{amount}]", cache_dir=str(tmp_path / "cache")
    )
    assert slice_indices(13, amount) == list(reference["i"])


def entry(datapath: Path, languages=("en",)) -> DatasetEntry:
    return DatasetEntry("D", datapath, "ASR", tuple(languages), (Partition("test"),))


def test_datapath_resolution(tmp_path):
    (tmp_path / "en-de").mkdir()
    (tmp_path / "en-de" / "test.jsonl").write_text("")
    (tmp_path / "test").mkdir()
    assert (
        resolve_split_path(entry(tmp_path, ["en-de", "en-fr"]), "en-de", "test") == tmp_path / "en-de" / "test.jsonl"
    )
    assert resolve_split_path(entry(tmp_path), "en", "test") == tmp_path / "test"  # one language: no language folder
    with pytest.raises(ValueError, match="en-fr"):  # several languages: each needs its own folder
        resolve_split_path(entry(tmp_path, ["en-de", "en-fr"]), "en-fr", "test")
    assert resolve_split_path(entry(tmp_path / "en-de" / "test.jsonl"), "en", "other") == (
        tmp_path / "en-de" / "test.jsonl"
    )
    assert language_fields("en-de") == {"source_language": "English", "target_language": "German"}


@pytest.mark.parametrize(
    ("partition", "task", "languages", "message"),
    [
        ({"amount": "half"}, "ASR", ["en"], "Bad amount"),
        ({"max_durtion": 3}, "ASR", ["en"], "unknown keys"),
        ({}, "ST", ["de"], "source-target"),
        ({}, "TTS", ["en"], "cannot be evaluated"),
    ],
)
def test_bad_configs_are_refused_with_a_reason(tmp_path, partition, task, languages, message, capsys):
    path = tmp_path / "bad.yaml"
    item = {"X": {"datapath": ".", "task": task, "languages": languages, "partitions": {"test": partition}}}
    path.write_text(yaml.safe_dump({"DATA": [item]}))
    with pytest.raises(ValueError, match=message):
        load_data_config(path)
    assert main(["evaluate", "--preset", "tiny", "--data_config", str(path), "--results_dir", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err


def test_datapath_variables_must_be_set(tmp_path, monkeypatch):
    path = tmp_path / "cfg.yaml"
    item = {"X": {"datapath": "${EVAL_DATA}/x", "task": "ASR", "languages": ["en"], "partitions": {"test": {}}}}
    path.write_text(yaml.safe_dump({"DATA": [item]}))
    monkeypatch.delenv("EVAL_DATA", raising=False)
    with pytest.raises(ValueError, match="EVAL_DATA"):
        load_data_config(path)
    monkeypatch.setenv("EVAL_DATA", "data")
    (parsed,) = load_data_config(path).entries
    assert parsed.datapath == tmp_path / "data" / "x"  # relative to the YAML's folder


def test_retrieval_without_matplotlib_names_the_plots_extra_before_loading_a_model(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    argv = [
        "retrieval",
        "--preset",
        "tiny",
        "--manifest",
        str(manifest_path("dev")),
        "--output_dir",
        str(tmp_path / "r"),
    ]
    with pytest.raises(ImportError, match=r"speechllm_hf\[plots\]"):
        main(argv)
    assert not (tmp_path / "r").exists()
