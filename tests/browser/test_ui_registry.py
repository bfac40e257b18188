"""The MLflow registry UI, driven in a real browser as a user pulling a student would.

An ``mlflow server`` (SQLite store, artifacts served through it) runs on 127.0.0.1 and holds a
tiny distillation: the one the Prefect UI test started from the Run form when it ran first in
this session (this file sorts after ``test_ui_prefect.py``), else one ``distillery distill`` run
here. In the UI: the registered model's page shows its ``champion`` and ``challenger`` aliases;
the version's page shows its lineage tags (graph fingerprint, trace-store version, spec hash,
Prefect flow-run id, git commit); its source run's artifacts show the plots (training curves,
fidelity per node, teacher-vs-student overlays of boxes and masks).

Screenshots of each page go to the test's tmp dir, and to docs/img/ for the README.
"""

from __future__ import annotations

import shutil
import sys

import pytest
from ui_support import background, quiet_env, save_shot, wait_until

MODEL = "shapes-tiny"  # the tiny spec's name
LINEAGE_TAGS = ("graph_fingerprint", "traces_version", "spec_hash", "prefect_flow_run_id", "git_commit")
PLOTS = (("plots", "loss_curves.png"), ("eval", "fidelity_per_node.png"), ("plots", "samples.png"))


@pytest.fixture(scope="module")
def registered(mlflow_server, prefect_ui_server, tiny_demo, tmp_path_factory):
    """The newest version of the tiny model in the MLflow server (a distill run here if none yet)."""
    import mlflow

    client = mlflow.MlflowClient(mlflow_server)
    if not client.search_model_versions(f"name = '{MODEL}'"):
        tmp = tmp_path_factory.mktemp("ui-distill")
        spec = tmp / "spec.yaml"
        shutil.copyfile(tiny_demo["spec_path"], spec)
        env = quiet_env(PREFECT_API_URL=f"{prefect_ui_server}/api", MLFLOW_TRACKING_URI=mlflow_server)
        cmd = [sys.executable, "-m", "distillery.cli", "distill", str(spec), "--inputs",
               str(tiny_demo["world"].split_dir("val")), "--workdir", str(tmp / "runs")]
        with background(cmd, env, tmp / "distill.log") as proc:
            wait_until(lambda: proc.poll() is not None, 900, "distillery distill", interval=2)
        assert proc.returncode == 0, (tmp / "distill.log").read_text()[-3000:]
    versions = client.search_model_versions(f"name = '{MODEL}'")
    newest = max(versions, key=lambda v: int(v.version))
    return {"client": client, "version": newest, "model": client.get_registered_model(MODEL),
            "run": client.get_run(newest.run_id)}


def close_assistant(page) -> None:
    """Close MLflow's assistant side panel (it covers part of every page) when it is open."""
    close = page.get_by_role("button", name="Close", exact=True)
    if close.count():
        close.first.click()


def test_model_page_shows_aliases_and_the_version_page_its_lineage(page, mlflow_server, registered, tmp_path):
    from playwright.sync_api import expect

    aliases = registered["model"].aliases  # alias -> version, as the registry holds them
    assert {"champion", "challenger"} <= set(aliases), aliases
    page.goto(f"{mlflow_server}/#/models/{MODEL}")
    for alias in ("champion", "challenger"):
        expect(page.get_by_text(f"@ {alias}", exact=True).first).to_be_visible()
    close_assistant(page)
    save_shot(page, tmp_path, "mlflow-model", keep=True)

    version = registered["version"]
    page.get_by_role("link", name=f"Version {version.version}", exact=True).click()
    expect(page.get_by_text("Source Run").first).to_be_visible()
    for alias, number in aliases.items():
        if str(number) == str(version.version):
            expect(page.get_by_text(f"@ {alias}", exact=True).first).to_be_visible()
    for tag in LINEAGE_TAGS:
        assert version.tags.get(tag), f"version {version.version} has no {tag} tag"
        expect(page.get_by_text(tag, exact=True).first).to_be_visible()
        expect(page.get_by_text(version.tags[tag], exact=True).first).to_be_visible()
    close_assistant(page)
    save_shot(page, tmp_path, "mlflow-version", keep=True)


def test_run_page_shows_training_curves_fidelity_and_overlays(page, mlflow_server, registered, tmp_path):
    from playwright.sync_api import expect

    version, run = registered["version"], registered["run"]
    page.goto(f"{mlflow_server}/#/models/{MODEL}/versions/{version.version}")
    page.get_by_role("link", name=run.info.run_name, exact=True).first.click()  # Source Run
    page.wait_for_url(f"**/runs/{run.info.run_id}**")
    close_assistant(page)
    page.get_by_text("Artifacts", exact=True).first.click()
    for folder, name in PLOTS:
        entry = page.get_by_text(name, exact=True).first
        if not entry.is_visible():
            page.get_by_text(folder, exact=True).first.click()  # open the folder in the tree
        entry.click()
        expect(page.get_by_text(f"{folder}/{name}", exact=True).first).to_be_visible()  # the preview's title
        preview = page.locator("img[src^='blob:']").first
        expect(preview).to_be_visible()
        wait_until(lambda img=preview: img.evaluate("img => img.complete && img.naturalWidth > 0"), 30,
                   f"{folder}/{name} drawn in the preview")
        save_shot(page, tmp_path, f"mlflow-run-{name.removesuffix('.png')}", keep=name == "samples.png")
