"""The import's resume record: camelCase JSON the operator can read, replaced atomically; a
record that does not parse counts as none; a continuation needs the same object and formats."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from nbdserver.importer.state import ImportState, load, save

STATE = ImportState("http://o/disk.img", '10:"etag"', "raw", "same", 10, 4)


def test_the_record_round_trips_with_camel_case_keys(tmp_path: Path) -> None:
    path = tmp_path / "d.img.import.json"
    save(str(path), STATE)
    on_disk = json.loads(path.read_text())
    assert on_disk["bytesDone"] == 4 and on_disk["outputFormat"] == "same"
    assert load(str(path)) == STATE
    assert not (tmp_path / "d.img.import.json.tmp").exists()


def test_a_missing_or_garbled_record_counts_as_none(tmp_path: Path) -> None:
    path = tmp_path / "d.img.import.json"
    assert load(str(path)) is None
    path.write_text("{not json")
    assert load(str(path)) is None
    path.write_text('{"surprise": 1}')
    assert load(str(path)) is None


def test_only_the_same_object_and_formats_continue_an_import() -> None:
    assert STATE.same_import(replace(STATE, bytes_done=0))
    assert not STATE.same_import(replace(STATE, validator='10:"other"'))
    assert not STATE.same_import(replace(STATE, output_format="raw"))
    assert not replace(STATE, validator="").same_import(replace(STATE, validator=""))


def test_completed_counts_every_byte_and_keeps_the_digest() -> None:
    done = STATE.completed("ab" * 32)
    assert done.complete and done.bytes_done == 10 and done.sha256 == "ab" * 32
