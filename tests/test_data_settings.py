"""split, name and revision of a data source: refused where they would be silently ignored."""

from __future__ import annotations

import json

import pytest

from dpokit.config import DataSource
from dpokit.data.sources import DataError, check_data_argument, describe, load_rows, open_source

ROWS = [{"prompt": f"Why? ({i})", "chosen": " Because.", "rejected": " No."} for i in range(3)]


def _files(tmp_path) -> dict[str, str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (tmp_path / "d.csv").write_text("prompt,chosen,rejected\n" + "".join(f"{r['prompt']},{r['chosen']},{r['rejected']}\n" for r in ROWS))
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "d.parquet")
    (tmp_path / "list.json").write_text(json.dumps(ROWS))
    (tmp_path / "lines.json").write_text("\n".join(json.dumps(r) for r in ROWS))
    (tmp_path / "one-line.json").write_text(json.dumps(ROWS[0]))
    (tmp_path / "split.json").write_text(json.dumps({"train": ROWS, "test": ROWS[:1]}))
    return {name: str(tmp_path / name) for name in ("d.jsonl", "d.csv", "d.parquet", "list.json", "lines.json", "one-line.json", "split.json")}


@pytest.mark.parametrize("setting", [{"split": "test"}, {"name": "sub"}, {"revision": "v1"}])
@pytest.mark.parametrize("name", ["d.jsonl", "d.csv", "d.parquet"])
def test_files_without_splits_refuse_split_name_and_revision(tmp_path, name, setting):
    path = _files(tmp_path)[name]
    (key, value), = setting.items()
    with pytest.raises(DataError) as e:
        open_source(DataSource(path, **setting))
    message = str(e.value)
    assert message.startswith(f"{path} is a ") and f"{key}={value} has no effect: remove {key} from this data source" in message
    assert "\n" not in message


def test_json_files_take_a_split_only_when_keyed_by_split(tmp_path):
    files = _files(tmp_path)
    assert load_rows(DataSource(files["split.json"], split="test")) == ROWS[:1]  # still works
    for name, what in (("list.json", "a list of rows"), ("lines.json", "JSON Lines"), ("one-line.json", "JSON Lines")):
        assert load_rows(DataSource(files[name])) == (ROWS if name != "one-line.json" else ROWS[:1])  # the default split is fine
        with pytest.raises(DataError, match=f"holds {what}, not lists keyed by split name, so split=test has no effect"):
            open_source(DataSource(files[name], split="test"))  # said on opening: a cached dataset is never read
    for setting in ({"name": "sub"}, {"revision": "v1"}):
        with pytest.raises(DataError, match="split.json is a .json file, so (name=sub|revision=v1) has no effect"):
            open_source(DataSource(files["split.json"], **setting))


def test_saved_folders_refuse_what_they_do_not_use(tmp_path):
    import datasets

    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "ds"))
    datasets.DatasetDict({"test": datasets.Dataset.from_list(ROWS[:2])}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError, match="ds is a dataset saved without splits .*, so split=test has no effect"):
        load_rows(DataSource(str(tmp_path / "ds"), split="test"))
    assert load_rows(DataSource(str(tmp_path / "dd"), split="test")) == ROWS[:2]
    with pytest.raises(DataError, match="dd is a local folder, so name=sub, revision=v1 has no effect: remove name and revision"):
        load_rows(DataSource(str(tmp_path / "dd"), split="test", name="sub", revision="v1"))


def test_describe_names_a_local_split(tmp_path):
    files = _files(tmp_path)
    assert describe(DataSource(files["split.json"])) == files["split.json"]
    assert describe(DataSource(files["split.json"], split="test")) == f"{files['split.json']} (split=test)"


def test_command_line_data_is_checked_with_its_flags(tmp_path):
    files = _files(tmp_path)
    missing = str(tmp_path / "nothere.jsonl")
    with pytest.raises(DataError, match=f"data file {missing} does not exist \\(check the path given to --from-data\\)"):
        check_data_argument(missing, "train", "--from-data")
    with pytest.raises(DataError, match=f"--split test has no effect on --data {files['d.jsonl']}, a .jsonl file, which has no splits: drop --split"):
        check_data_argument(files["d.jsonl"], "test")
    check_data_argument(files["d.jsonl"], "train")
    check_data_argument(files["split.json"], "test")  # a .json file may be keyed by split
    check_data_argument("some-org/some-dataset", "test")  # a hub id: nothing to check here


def test_data_inspect_refuses_an_ignored_split(workdir, tmp_path, capsys):
    from dpokit.cli import main

    path = _files(tmp_path)["d.jsonl"]
    with pytest.raises(SystemExit) as exc:
        main(["data", "inspect", path, f"model.name_or_path={workdir / 'model'}", "data.train.split=test"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("dpokit: error: ") and "split=test has no effect" in err and "Traceback" not in err
