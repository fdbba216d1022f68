"""The data-path benchmark's quick CPU run: both providers, both presets, files written."""

import json

from avfast.bench import data_pipeline


def test_quick_cpu_run_writes_results(tmp_path, capsys):
    out = tmp_path / "results"
    code = data_pipeline.main(["--quick", "--device", "cpu", "--cache", str(tmp_path / "cache"), "--out", str(out)])
    assert "elapsed " in capsys.readouterr().out
    payload = json.loads((out / "data_pipeline.json").read_text())
    assert code == 0, payload["rows"]
    rows = {(r["preset"], r["provider"]): r for r in payload["rows"]}
    assert set(rows) == {(p, q) for p in ("deepavfusion", "stgcma") for q in ("cpu_pyav", "dali")}
    assert all(r["status"] == "ok" and r["clips_per_s"] > 0 for r in rows.values())
    assert rows[("stgcma", "dali")]["shapes"]["audio"] == rows[("stgcma", "cpu_pyav")]["shapes"]["audio"] == [2, 10, 102, 128]
    assert (out / "data_pipeline.md").read_text().count("| stgcma |") == 2
    assert "dali / cpu_pyav" in (out / "data_pipeline.md").read_text()


def test_bad_preset_names_the_choices(tmp_path):
    import pytest

    with pytest.raises(SystemExit, match="--presets: expected names from deepavfusion,mavt,stgcma,dgsct, got 'x'"):
        data_pipeline.main(["--quick", "--presets", "x", "--out", str(tmp_path)])
