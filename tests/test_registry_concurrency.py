"""Ten distillations registering the same model at once, on the SQLite store the embedded default
uses: ten distinct versions, no error, and aliases that end where one-at-a-time would leave them
(``challenger`` on the newest version, ``champion`` on the best by the comparison metric); the
driver is ``benchmarks.reliability.concurrent_registrations``, whose figures RESULTS.md shows."""

from __future__ import annotations

from registry_support import build_student, make_spec, mlflow_uri_restored

from benchmarks.reliability import concurrent_registrations


def test_ten_concurrent_registrations_give_ten_versions_and_consistent_aliases(tmp_path):
    spec = make_spec(f"sqlite:///{tmp_path / 'mlflow.db'}", name="concurrent", gate={"answer_agreement": 0.5})
    with mlflow_uri_restored():
        out = concurrent_registrations(spec, build_student(tmp_path / "student"), tmp_path)
    assert out["errors"] == []
    assert sorted(int(v) for v in out["versions"]) == list(range(1, 11))
    assert out["challenger_is_newest"] and out["champion_is_best"] and out["champion_tag"] == "champion"
