"""Ten distillations registering the same model at once, on the SQLite store the embedded default
uses: ten distinct versions, no error, and aliases that end where one-at-a-time would leave them
(``challenger`` on the newest version, ``champion`` on the best by the comparison metric)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from registry_support import build_student, make_spec, mlflow_uri_restored

NAME = "concurrent"
TESTS = Path(__file__).resolve().parent
CHILD = """
import json, sys
sys.path.insert(0, sys.argv[1])
from registry_support import make_spec
from distillery.registry import models

uri, model_uri, score, version = sys.argv[2], sys.argv[3], float(sys.argv[4]), int(sys.argv[5])
spec = make_spec(uri, name="%s", gate={"answer_agreement": 0.5})
metrics = {"answer_agreement": score}
mv = models.register_student(model_uri, spec, metrics, {"graph_fingerprint": "gf", "traces_version": version})
decision = models.promote(spec.name, mv.version, metrics, spec.registry.gate, "answer_agreement")
print(json.dumps({"version": mv.version, "promoted": decision.promoted}))
""" % NAME


def test_ten_concurrent_registrations_give_ten_versions_and_consistent_aliases(tmp_path):
    import mlflow

    from distillery.registry import models, tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    student = build_student(tmp_path / "student")
    scores = [0.61, 0.93, 0.72, 0.88, 0.97, 0.65, 0.91, 0.70, 0.95, 0.80]
    logged = []
    with mlflow_uri_restored():
        spec = make_spec(uri, name=NAME)
        for i, score in enumerate(scores):  # ten training runs, each with its logged student
            with tracking.start_run(spec.registry, spec, run_name=f"train-{i}"):
                logged.append(models.log_student(student, spec, {"answer_agreement": score}, {"traces_version": i}))
        script = tmp_path / "register.py"
        script.write_text(CHILD)
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING")}
        procs = [subprocess.Popen([sys.executable, str(script), str(TESTS), uri, model_uri, str(score), str(i)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
                 for i, (model_uri, score) in enumerate(zip(logged, scores))]
        results = [(p.wait(timeout=300), p.stdout.read(), p.stderr.read()) for p in procs]
        assert [rc for rc, _, _ in results] == [0] * 10, [err[-1500:] for rc, _, err in results if rc]
        versions = [json.loads(out.strip().splitlines()[-1])["version"] for _, out, _ in results]
        assert sorted(int(v) for v in versions) == list(range(1, 11))

        mlflow.set_tracking_uri(uri)
        client = mlflow.MlflowClient()
        assert str(client.get_model_version_by_alias(NAME, "challenger").version) == "10"
        champion = client.get_model_version_by_alias(NAME, "champion")
        best = versions[scores.index(max(scores))]
        assert str(champion.version) == str(best) and champion.tags["promotion"] == "champion"
