"""The Prefect UI, driven in a real browser as an operator would.

A Prefect server with its UI runs on 127.0.0.1; ``distillery serve`` serves the tiny example's
spec against it (distill/manual, distill/recurring on a cron, train/local), logging to an MLflow
server. In the UI: Deployments -> manual -> Run -> Custom run shows each teacher node's fields,
the inputs folder is changed in the form, the run is submitted and watched until it shows
Completed, and its page shows the artifacts (fidelity per node, the registered version with the
promotion decision) and a link that opens the MLflow run. The recurring deployment shows its cron
schedule, and pausing it in the UI (the switch of its schedule, which is where Prefect 3.8's UI
pauses a deployment's schedule) removes its scheduled runs, and none come back.

Screenshots of each page go to the test's tmp dir; the run's and the form's also to docs/img/.
"""

from __future__ import annotations

import shutil
import sys
import time

import pytest
from ui_support import background, http_json, quiet_env, save_shot, wait_until

CRON = "0 4 * * *"
CRON_TEXT = "At 04:00 AM"  # how the UI spells CRON
RUN_TIMEOUT_S = 600


def api(base: str, path: str, body: dict | None = None):
    """The Prefect API's answer (GET, or POST ``body``)."""
    return http_json(f"{base}/api{path}", body)


def deployments(base: str) -> dict[str, dict]:
    return {d["name"]: d for d in api(base, "/deployments/filter", {})}


def runs_of(base: str, deployment_id: str) -> list[dict]:
    return api(base, "/flow_runs/filter", {"deployments": {"id": {"any_": [deployment_id]}}})


def scheduled_runs(base: str, deployment_id: str) -> list[dict]:
    return api(base, "/flow_runs/filter", {"deployments": {"id": {"any_": [deployment_id]}},
                                           "flow_runs": {"state": {"type": {"any_": ["SCHEDULED"]}}}})


@pytest.fixture(scope="module")
def served(tiny_demo, prefect_ui_server, mlflow_server, tmp_path_factory):
    """`distillery serve` of the tiny spec against the UI's server; the deployments by name."""
    tmp = tmp_path_factory.mktemp("ui-serve")
    spec = tmp / "spec.yaml"
    shutil.copyfile(tiny_demo["spec_path"], spec)  # traces and runs land in tmp, not beside the shared spec
    world = tiny_demo["world"]
    env = quiet_env(PREFECT_API_URL=f"{prefect_ui_server}/api", MLFLOW_TRACKING_URI=mlflow_server,
                    PREFECT_RUNNER_POLL_FREQUENCY="2")  # pick a triggered run up within 2 s
    cmd = [sys.executable, "-m", "distillery.cli", "serve", str(spec), "--inputs", str(world.split_dir("train")),
           "--workdir", str(tmp / "runs"), "--cron", CRON]
    log = tmp / "serve.log"
    with background(cmd, env, log) as proc:
        def ready():
            if proc.poll() is not None:
                pytest.fail(f"distillery serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            deps = deployments(prefect_ui_server)
            return deps if len(deps) >= 3 else None
        deps = wait_until(ready, 120, "distillery serve's three deployments")
        yield {"ui": prefect_ui_server, "mlflow": mlflow_server, "deployments": deps, "log": log,
               "other_inputs": str(world.split_dir("val"))}


def open_deployment(page, ui: str, name: str) -> None:
    """From the UI's front page: Deployments in the side bar, then the deployment's link."""
    page.goto(ui)
    page.get_by_role("link", name="Deployments", exact=True).click()
    page.get_by_role("link", name=name, exact=True).click()
    page.wait_for_url("**/deployments/deployment/**")


def wait_for_state(page, state: str, timeout: float) -> None:
    """Watch the flow-run page (reloading now and then) until its state badge reads ``state``."""
    deadline = time.monotonic() + timeout
    badge = page.get_by_text(state, exact=True).first
    while time.monotonic() < deadline:
        try:
            badge.wait_for(state="visible", timeout=10_000)
            return
        except Exception:
            if page.get_by_text("Failed", exact=True).first.is_visible() or \
                    page.get_by_text("Crashed", exact=True).first.is_visible():
                pytest.fail(f"the flow run ended {page.url}: see its logs")
            page.reload()
    pytest.fail(f"flow run not {state} after {timeout:.0f} s: {page.url}")


def submit_form(page, tries: int = 2) -> None:
    """Click the custom-run form's Submit and check what the server said of the parameters.

    The form first posts its values to the server (``/ui/schemas/validate``), then, if they are
    valid, creates the run. A click the page dropped (no validation request within 60 s, as seen
    once on a loaded CI machine) is clicked again, once; parameters the server rejects fail the
    test with the server's errors."""
    for attempt in range(1, tries + 1):
        try:
            with page.expect_request(lambda r: "/ui/schemas/validate" in r.url, timeout=60_000) as sent:
                page.get_by_role("button", name="Submit").click()
        except Exception:  # playwright's TimeoutError: the click sent nothing
            if attempt == tries:
                pytest.fail(f"Submit sent no validation request in {tries} clicks: {page.url}")
            continue
        answer = sent.value.response()
        assert answer is not None and answer.ok, f"/ui/schemas/validate answered {answer and answer.status}"
        verdict = answer.json()
        assert verdict.get("valid"), f"the server rejected the form's parameters: {verdict.get('errors')}"
        return


def test_custom_run_from_the_form_completes_with_artifacts_and_mlflow_link(page, served, tmp_path):
    from playwright.sync_api import expect

    ui, new_inputs = served["ui"], served["other_inputs"]
    open_deployment(page, ui, "manual")
    save_shot(page, tmp_path, "prefect-deployment-manual")
    page.get_by_role("button", name="Run").click()
    page.get_by_role("menuitem", name="Custom run").click()

    # Each teacher node is a group of fields with its type's settings, not one JSON blob.
    expect(page.get_by_label("Top K (Optional)", exact=True)).to_have_value("4")  # the rag node's top_k
    expect(page.get_by_label("Prompt", exact=True)).to_contain_text("{request.question}")  # the llm node's
    expect(page.get_by_label("Weights", exact=True)).to_have_value(str(served["deployments"]["manual"]["parameters"]
                                                                      ["spec"]["teachers"]["detector"]["weights"]))
    inputs = page.get_by_label("inputs (Optional)", exact=True)
    inputs.fill(new_inputs)
    save_shot(page, tmp_path, "prefect-custom-run-form-full")
    page.get_by_label("Top K (Optional)", exact=True).evaluate("e => e.scrollIntoView({block: 'center'})")
    save_shot(page, tmp_path, "prefect-custom-run-form", keep=True, full_page=False)  # the nodes' fields
    manual_id = served["deployments"]["manual"]["id"]
    before = {r["id"] for r in runs_of(ui, manual_id)}
    try:
        submit_form(page)
        created = wait_until(lambda: [r for r in runs_of(ui, manual_id) if r["id"] not in before], 120,
                             "the flow run submitted from the form")
    finally:
        save_shot(page, tmp_path, "prefect-after-submit")
    assert len(created) == 1, created
    run = created[0]
    assert run["parameters"]["inputs"] == new_inputs  # the value typed in the form reached the run
    view = page.get_by_text("View run", exact=True)  # the toast: "<run> scheduled to start now  View run"
    try:
        view.first.click(timeout=5_000)
    except Exception:  # the toast has gone (or the page moved on): the deployment's list of runs
        open_deployment(page, ui, "manual")
        page.locator(f"a[href*='/runs/flow-run/{run['id']}']").first.click()
    page.wait_for_url(f"**/runs/flow-run/{run['id']}**")
    wait_for_state(page, "Completed", RUN_TIMEOUT_S)
    save_shot(page, tmp_path, "prefect-run", keep=True)

    page.get_by_role("tab", name="Artifacts").click()
    for key in ("fidelity", "mlflow-run", "registered-version"):
        expect(page.get_by_role("heading", name=key, exact=True)).to_be_visible()
    expect(page.get_by_text("Student fidelity per node").first).to_be_visible()  # the fidelity table's card
    expect(page.get_by_text("champion: True").first).to_be_visible()  # the promotion decision
    save_shot(page, tmp_path, "prefect-run-artifacts", keep=True)

    page.get_by_role("heading", name="mlflow-run", exact=True).click()  # the key's page: its latest artifact
    page.wait_for_url("**/artifacts/key/mlflow-run**")
    page.locator("a[href*='/artifacts/artifact/']").first.click()  # that artifact's page, which shows the link
    page.wait_for_url("**/artifacts/artifact/**")
    link = page.locator(f"a[href^='{served['mlflow']}/#/experiments/']").first
    expect(link).to_be_visible()
    href = link.get_attribute("href")
    save_shot(page, tmp_path, "prefect-mlflow-link")
    if link.get_attribute("target") == "_blank":
        with page.context.expect_page() as opened:
            link.click()
        mlflow_page = opened.value
    else:
        link.click()
        mlflow_page = page
    mlflow_page.wait_for_url(f"**{href.split('#', 1)[1]}**")
    expect(mlflow_page.get_by_text("distill-shapes-tiny").first).to_be_visible()  # the run's name
    save_shot(mlflow_page, tmp_path, "prefect-to-mlflow-run")


def test_recurring_deployment_shows_its_cron_and_pausing_stops_its_schedule(page, served, tmp_path):
    from playwright.sync_api import expect

    ui = served["ui"]
    recurring = served["deployments"]["recurring"]
    assert [s["schedule"]["cron"] for s in recurring["schedules"]] == [CRON]
    wait_until(lambda: scheduled_runs(ui, recurring["id"]), 90, "the recurring deployment's scheduled runs")

    open_deployment(page, ui, "recurring")
    expect(page.get_by_text(CRON_TEXT).first).to_be_visible()
    save_shot(page, tmp_path, "prefect-recurring", keep=True)

    # The deployment page's Schedules panel: one switch per schedule ("toggle At 04:00 AM").
    toggle = page.get_by_role("switch", name=f"toggle {CRON_TEXT}")
    expect(toggle).to_be_checked()
    toggle.click()
    expect(toggle).not_to_be_checked()
    wait_until(lambda: not any(s["active"] for s in api(ui, f"/deployments/{recurring['id']}")["schedules"]), 30,
               "the recurring schedule paused")
    wait_until(lambda: not scheduled_runs(ui, recurring["id"]), 60, "the paused schedule's runs removed")
    page.reload()
    expect(page.get_by_role("switch", name=f"toggle {CRON_TEXT}")).not_to_be_checked()
    save_shot(page, tmp_path, "prefect-recurring-paused", keep=True)
    time.sleep(6)  # a scheduler pass (every 5 s on this server) must not schedule it again
    assert scheduled_runs(ui, recurring["id"]) == []
