"""Result folders: the JSONL log keeps every valid record, settings refuse stale results."""

import json

import pytest

from dami_jax.errors import InputError
from dami_jax.evals.records import JsonlLog, RecordsError, ResultsFolder, SharedLog, StaleResultsError, merge_parts, part_paths
from dami_jax.files import check_output_folder, write_atomic


def _lines(*records) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


def test_a_torn_last_line_is_dropped_and_nothing_else(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text(_lines({"a": 1}, {"a": 2}) + '{"a": 3, "b": "cut sho')
    log = JsonlLog(path)
    assert log.records == [{"a": 1}, {"a": 2}]
    assert path.read_text() == _lines({"a": 1}, {"a": 2})  # the torn bytes are gone, the rest is intact
    log.extend([{"a": 3}])
    assert JsonlLog(path).records == [{"a": 1}, {"a": 2}, {"a": 3}]


def test_a_complete_last_record_without_newline_is_kept(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text(_lines({"a": 1}) + '{"a": 2}')
    assert JsonlLog(path).records == [{"a": 1}, {"a": 2}]
    JsonlLog(path).extend([{"a": 3}])
    assert JsonlLog(path).records == [{"a": 1}, {"a": 2}, {"a": 3}]


def test_processes_append_to_parts_of_their_own_and_read_everyone_s(tmp_path):
    main = tmp_path / "records.jsonl"
    main.write_text(_lines({"k": 0}))
    first, second = SharedLog(main, 0), SharedLog(main, 1)
    first.extend([{"k": 1}])
    second.extend([{"k": 2}])
    part = tmp_path / "records.process1.jsonl"
    torn = part.read_text() + '{"k": 3, "cut'  # process 1 is mid-append
    part.write_text(torn)
    assert sorted(r["k"] for r in SharedLog(main, 0).records) == [0, 1, 2]
    assert part.read_text() == torn  # another process's part is read, never cut
    assert sorted(r["k"] for r in SharedLog(main, 1).records) == [0, 1, 2]  # its own process repairs it
    assert part.read_text() == _lines({"k": 2})
    assert part_paths(main) == [tmp_path / "records.process0.jsonl", part]
    assert main.read_text() == _lines({"k": 0})  # no process writes the log itself


def test_merging_folds_the_parts_in_once(tmp_path):
    main = tmp_path / "records.jsonl"
    SharedLog(main, 0).extend([{"k": 1}, {"k": 3}])
    SharedLog(main, 1).extend([{"k": 2}])
    SharedLog(main, 1).extend([{"k": 2}])  # a repeat (as after a crash between a merge's write and its cleanup)
    merged = merge_parts(main, key=lambda r: r["k"])
    assert merged == JsonlLog(main).records == [{"k": 1}, {"k": 3}, {"k": 2}] and not part_paths(main)
    assert merge_parts(main, key=lambda r: r["k"]) == merged  # nothing left to fold: unchanged


def test_an_unreadable_line_elsewhere_is_an_error_naming_file_and_line(tmp_path):
    path = tmp_path / "r.jsonl"
    content = _lines({"a": 1}) + "not json\n" + _lines({"a": 3}, {"a": 4})
    path.write_text(content)
    with pytest.raises(RecordsError, match=rf"{path}:2: unreadable record"):
        JsonlLog(path)
    assert path.read_text() == content  # nothing valid was deleted
    path.write_text(_lines({"a": 1}) + "\n   \n" + _lines({"a": 2}))
    assert JsonlLog(path).records == [{"a": 1}, {"a": 2}]  # blank lines are not records


def test_records_read_back_as_written(tmp_path):
    log = JsonlLog(tmp_path / "sub" / "r.jsonl")
    log.extend([{"t": (1, 2), "x": 0.5}])
    assert log.records == [{"t": [1, 2], "x": 0.5}] == JsonlLog(tmp_path / "sub" / "r.jsonl").records


def test_settings_are_checked_merged_and_moved_aside(tmp_path):
    folder = ResultsFolder(tmp_path / "run")
    folder.check({"seed": 0})  # nothing stored yet: nothing to compare
    folder.claim({"seed": 0, "layers": (0, 1)})
    folder.claim({"model": "abc"})  # settings not compared before are added
    assert json.loads((tmp_path / "run" / "settings.json").read_text()) == {"seed": 0, "layers": [0, 1], "model": "abc"}
    folder.check({"layers": [0, 1]})
    with pytest.raises(StaleResultsError, match=r"seed: 0 stored, 1 now; model: \"abc\" stored, \"xyz\" now") as refused:
        folder.check({"seed": 1, "model": "xyz", "layers": (0, 1)})
    assert refused.value.differences == {"seed": (0, 1), "model": ("abc", "xyz")}
    folder.log("r.jsonl").extend([{"a": 1}])
    aside = folder.start_fresh()
    assert aside.parent == folder.path and aside.name.startswith("stale-")
    assert sorted(p.name for p in aside.iterdir()) == ["r.jsonl", "settings.json"]
    assert [p.name for p in folder.path.iterdir()] == [aside.name]
    folder.check({"seed": 1})  # a fresh start
    assert ResultsFolder(tmp_path / "empty").start_fresh() is None


def test_a_required_setting_refuses_results_made_before_it_existed(tmp_path):
    folder = ResultsFolder(tmp_path)
    folder.claim({"seed": 0})
    folder.check({"seed": 0, "version": 2}, required=["version"])  # settings but no results yet: nothing to refuse
    folder.log("r.jsonl").extend([{"a": 1}])
    folder.check({"seed": 0, "version": 2})  # not required: added later, as any new setting
    with pytest.raises(StaleResultsError, match="version: none stored, 2 now") as refused:
        folder.claim({"seed": 0, "version": 2}, required=["version"])
    assert "version" not in folder.stored_settings() and list(refused.value.differences) == ["version"]
    (tmp_path / "r.jsonl").unlink()
    folder.claim({"seed": 0, "version": 2}, required=["version"])
    folder.log("r.jsonl").extend([{"a": 1}])
    folder.check({"seed": 0, "version": 2}, required=["version"])
    with pytest.raises(StaleResultsError, match="version: 2 stored, 3 now"):
        folder.check({"seed": 0, "version": 3}, required=["version"])


def test_results_without_settings_are_not_trusted(tmp_path):
    JsonlLog(tmp_path / "records.jsonl").extend([{"a": 1}])  # made before results folders recorded settings
    with pytest.raises(StaleResultsError, match="no settings.json: an older dami-jax made them"):
        ResultsFolder(tmp_path).check({"seed": 0})


def test_output_folders_are_checked_before_anything_is_written(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        ResultsFolder(afile)
    with pytest.raises(ValueError, match="cannot be created: .*afile is a file"):
        check_output_folder(afile / "sub" / "dir")
    assert check_output_folder(tmp_path / "new" / "dir") == tmp_path / "new" / "dir"
    assert not (tmp_path / "new").exists()
    write_atomic(tmp_path / "new" / "f.txt", "hello")
    assert (tmp_path / "new" / "f.txt").read_text() == "hello" and len(list((tmp_path / "new").iterdir())) == 1


def test_an_unreadable_settings_file_is_named(tmp_path):
    (tmp_path / "settings.json").write_text("{not json")
    with pytest.raises(InputError, match=rf"{tmp_path / 'settings.json'}: not valid JSON"):
        ResultsFolder(tmp_path).check({"seed": 0})
