"""The train-step benchmark's quick CPU run: the upstream-vs-avfast check and one row per
provider, mode and method."""

import json

from avfast.bench import train_step


def test_quick_cpu_run_checks_and_writes_results(tmp_path):
    code = train_step.main(["--quick", "--device", "cpu", "--out", str(tmp_path),
                            "--providers", "upstream_eager,avfast"])
    payload = json.loads((tmp_path / "train_step.json").read_text())
    assert code == 0 and payload["check"]["passed"]
    assert {e["case"] for e in payload["check"]["entries"]} == {c.name for c in train_step.QUICK_CASES}
    rows = payload["rows"]
    assert len(rows) == len(train_step.QUICK_CASES) * 2 * 2
    assert all(r["status"] == "ok" and r["median_ms"] > 0 for r in rows), [r["error"] for r in rows]
    assert "Train step" in (tmp_path / "train_step.md").read_text()


def test_cases_cover_every_method_at_upstream_sizes():
    assert {c.method for c in train_step.GPU_CASES} == {"mavt", "stgcma", "dgsct", "deepavfusion"}
    assert {c.size for c in train_step.GPU_CASES if c.method == "stgcma"} == {"base", "large"}
    assert {dict(c.overrides).get("fusion_arch") for c in train_step.GPU_CASES
            if c.method == "deepavfusion"} == {"dense", "factorized"}


def test_quick_cpu_default_leaves_out_the_compiled_providers(tmp_path, capsys):
    """`avfast bench train-step --quick` on a CPU must stay quick: torch.compile of four
    models on the CPU took minutes, so the default providers there are the eager ones."""
    code = train_step.main(["--quick", "--device", "cpu", "--out", str(tmp_path), "--cases", "mavt"])
    payload = json.loads((tmp_path / "train_step.json").read_text())
    assert code == 0 and {r["provider"] for r in payload["rows"]} == {"upstream_eager", "avfast"}
    out = capsys.readouterr().out
    assert "the compiled providers are left out" in out and "elapsed " in out
