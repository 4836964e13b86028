"""Headless-Chromium helpers for the end-to-end test: look at a run in the Prefect and MLflow UIs.
Checks match visible text, not CSS classes; every wait polls the page (no sleeps); a failing
check first saves `FAILED-<step>.png` and `FAILED-<step>.txt` (URL, title, page text)."""
from __future__ import annotations

import json
import os
import signal
import tempfile
import time
import warnings
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path
from typing import Callable, Iterator, Sequence
from urllib import parse, request

from selenium import webdriver
from selenium.common.exceptions import TimeoutException, WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

from flows.env import mlflow_ui_url

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
TIMEOUT = 60.0  # the SPAs load slowly on 2 cores
FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--window-size=1600,1000")
# Per text in arguments[0], the innermost visible elements whose whole text it is (one DOM pass).
_FIND_JS = """const norm = s => (s || '').replace(/\\s+/g, ' ').trim();
const all = [...document.querySelectorAll('body *')].map(e => [e, norm(e.textContent)]);
return arguments[0].map(want => {
  const hits = all.filter(([e, t]) => t === want && e.getClientRects().length > 0).map(([e]) => e);
  return hits.filter(e => !hits.some(o => o !== e && e.contains(o))); });"""
# Sets a (React or Vue) input's value without key events: chromedriver's take seconds each here.
_TYPE_JS = """Object.getOwnPropertyDescriptor(HTMLInputElement.prototype, 'value').set.call(...arguments);
for (const kind of ['input', 'change']) arguments[0].dispatchEvent(new Event(kind, {bubbles: true}));"""
_POPUPS = ("Got it", "Dismiss", "Skip", "No thanks", "Maybe later")  # new-feature tours, modals


@contextmanager
def chromium(screenshot_dir: Path) -> Iterator[WebDriver]:
    """A headless Chromium (fresh profile, never touching the network), all gone afterwards."""
    screenshot_dir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager never runs: both paths are given
    with ExitStack() as stack:  # exits: quit, reap the processes, remove the profile
        profile = stack.enter_context(tempfile.TemporaryDirectory(prefix="pai-chromium-"))
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for flag in (*FLAGS, f"--user-data-dir={profile}"):
            options.add_argument(flag)
        # Own process group for chromium's children; XDG dirs put the profile on crashpad's command line.
        env = {**os.environ, "XDG_CONFIG_HOME": f"{profile}/config", "XDG_CACHE_HOME": f"{profile}/cache"}
        service = Service(executable_path=CHROMEDRIVER, env=env, popen_kw={"start_new_session": True},
                          log_output=str(screenshot_dir / "chromedriver.log"))
        stack.callback(_reap, service, profile)
        driver = webdriver.Chrome(service=service, options=options)
        stack.callback(driver.quit)
        yield driver


def _reap(service: Service, profile: str) -> None:
    """Give chromedriver's and chromium's processes 5 s to exit, then SIGKILL those left."""
    pgid = service.process.pid if getattr(service, "process", None) else -1  # -1: it never started
    def ours(proc: Path) -> bool:
        with suppress(OSError, ValueError):
            state, _, group = (proc / "stat").read_text().rsplit(")", 1)[1].split()[:3]
            return state != "Z" and (int(group) == pgid
                                     or profile.encode() in (proc / "cmdline").read_bytes())
        return False
    start = time.monotonic()
    while pids := [int(proc.name) for proc in Path("/proc").glob("[0-9]*") if ours(proc)]:
        if time.monotonic() - start > 10:
            return warnings.warn(f"chromium processes survived SIGKILL: {pids}")
        for pid in pids if time.monotonic() - start > 5 else ():
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)


def _find(driver: WebDriver, texts: Sequence[str]) -> list[list]:
    return driver.execute_script(_FIND_JS, [" ".join(t.split()) for t in texts])


def _missing(driver: WebDriver, texts: Sequence[str]) -> list[str]:
    return [t for t, hits in zip(texts, _find(driver, texts)) if not hits]


def _wait(driver: WebDriver, until: Callable[[WebDriver], object], shots: Path, step: str,
          message: Callable[[], str]) -> None:
    """Wait for `until`; else save a screenshot and the page text, and fail naming both."""
    with suppress(TimeoutException):
        WebDriverWait(driver, TIMEOUT, poll_frequency=0.5).until(until)
        return
    png, txt = shots / f"FAILED-{step}.png", shots / f"FAILED-{step}.txt"
    with suppress(WebDriverException):
        driver.save_screenshot(str(png))
        body = driver.find_element("tag name", "body").text
        txt.write_text(f"{driver.current_url}\n{driver.title}\n\n{body}")
    raise AssertionError(f"{step}: {message()} after {TIMEOUT:.0f}s, {driver.current_url} ({png}, {txt})")


def wait_shown(driver: WebDriver, texts: Sequence[str], shots: Path, step: str) -> None:
    """Each text is the whole text of some visible element (so 'Completed' is not 'Completed()')."""
    _wait(driver, lambda d: not _missing(d, texts), shots, step,
          lambda: f"not shown: {_missing(driver, texts)}")


def _click(driver: WebDriver, *labels: str) -> bool:
    """Click the first visible element with each label (by JS where an overlay intercepts it)."""
    for el in (hits := [els[0] for els in _find(driver, labels) if els]):
        try:
            el.click()
        except WebDriverException:
            driver.execute_script("arguments[0].click()", el)
    return bool(hits)


def search_list(driver: WebDriver, names: Sequence[str], shots: Path, step: str) -> None:
    """Wait for a list to show `names`, typing those not on its first page into its search box."""
    with suppress(TimeoutException):  # the list has loaded once one name shows
        WebDriverWait(driver, TIMEOUT / 2, 0.5).until(lambda d: len(_missing(d, names)) < len(names))
    missing = _missing(driver, names)
    boxes = [b for b in driver.find_elements("css selector", "input") if missing and b.is_displayed()
             and "search" in f"{b.get_attribute('type')} {b.get_attribute('placeholder')}".lower()]
    for name in missing:
        if boxes:
            driver.execute_script(_TYPE_JS, boxes[0], name)
        wait_shown(driver, [name], shots, step)
    if boxes:
        driver.execute_script(_TYPE_JS, boxes[0], "")


def _get_json(url: str, body: dict | None = None) -> dict:
    data = None if body is None else json.dumps(body).encode()  # None: GET
    with request.urlopen(request.Request(url, data, {"Content-Type": "application/json"}), timeout=30) as r:
        return json.load(r)


def check_prefect_ui(driver: WebDriver, base_url: str, deployment_name: str, flow_run_id: str,
                     flow_run_name: str, stage_names: Sequence[str], shots: Path,
                     ui: str | None = None) -> None:
    """The deployments list shows the deployment; the run page its name, deployment, state Completed
    and (Task Runs tab) each stage's task run. `ui`: 'v1' (plain paths), 'v2', None: server default."""
    base = base_url.rstrip("/")
    settings = _get_json(f"{base}/ui-settings")
    # `prefect server start --port N` leaves the UI's API at :4200 unless PREFECT_UI_API_URL is set
    api_port = parse.urlsplit(settings.get("api_url") or "/api").port
    assert api_port in (None, parse.urlsplit(base).port), f"the UI at {base} uses {settings['api_url']}"
    prefix = (settings.get(f"{ui or settings.get('default_ui') or 'v1'}_base_url") or "").rstrip("/")

    driver.get(f"{base}{prefix}/deployments")
    search_list(driver, [deployment_name], shots, "prefect-deployments")
    driver.save_screenshot(str(shots / "prefect-deployments.png"))
    driver.get(f"{base}{prefix}/runs/flow-run/{flow_run_id}")
    wait_shown(driver, [flow_run_name, deployment_name, "Completed", "Task Runs"], shots, "prefect-flow-run")
    def task_runs_tab(d: WebDriver) -> bool:  # open: ARIA says so, or the URL (v1 UI)
        url = parse.unquote_plus(d.current_url).replace(" ", "").lower()
        return _click(d, "Task Runs") and ("tab=taskruns" in url or d.execute_script(
            "return arguments[0].some(e => e.closest('[aria-selected=true]'))", _find(d, ["Task Runs"])[0]))
    _wait(driver, task_runs_tab, shots, "prefect-flow-run", lambda: "could not open the Task Runs tab")
    search_list(driver, stage_names, shots, "prefect-flow-run")
    driver.execute_script("window.scrollTo(0, 0)")
    driver.save_screenshot(str(shots / "prefect-flow-run.png"))  # state badge, timeline
    driver.execute_script("arguments[0].scrollIntoView()", _find(driver, ["Task Runs"])[0][0])
    driver.save_screenshot(str(shots / "prefect-task-runs.png"))


def check_mlflow_ui(driver: WebDriver, base_url: str, experiment_name: str, run_name: str,
                    metric_names: Sequence[str], shots: Path) -> None:
    """The experiments list shows the experiment, its runs table (model-training view) the run
    (the latest of that name), and the run's page its name and each metric name."""
    base, api = base_url.rstrip("/"), base_url.rstrip("/") + "/api/2.0/mlflow"
    query = parse.urlencode({"experiment_name": experiment_name})
    exp_id = _get_json(f"{api}/experiments/get-by-name?{query}")["experiment"]["experiment_id"]
    runs = _get_json(f"{api}/runs/search", {
        "experiment_ids": [exp_id], "filter": f"attributes.run_name = '{run_name}'",
        "order_by": ["attributes.start_time DESC"], "max_results": 1}).get("runs")
    assert runs, f"MLflow has no run {run_name!r} in experiment {experiment_name!r}"
    driver.get(mlflow_ui_url(base=base))  # the link `pai server up` prints
    search_list(driver, [experiment_name], shots, "mlflow-experiments")
    # The assistant panel would hide the table's right half; the model-training view comes from
    # pai's links alone (MLflow 3 otherwise opens its GenAI view).
    driver.execute_script("localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false');")
    driver.get(mlflow_ui_url(exp_id, base=base))
    driver.refresh()  # the app reads the preferences when it starts
    with suppress(TimeoutException):
        WebDriverWait(driver, TIMEOUT / 2, 0.5).until(lambda d: not _missing(d, [run_name]))
    if _missing(driver, [run_name]):  # a feature tour's modal
        _click(driver, *_POPUPS)
    wait_shown(driver, [experiment_name, run_name, "Columns"], shots, "mlflow-experiment")  # the runs table
    _click(driver, *_POPUPS)
    driver.save_screenshot(str(shots / "mlflow-experiment.png"))
    driver.get(mlflow_ui_url(exp_id, runs[0]["info"]["run_id"], base=base))
    wait_shown(driver, [run_name], shots, "mlflow-run")
    search_list(driver, metric_names, shots, "mlflow-run")
    for hits in _find(driver, metric_names[:1]):
        driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", hits[0])
    driver.save_screenshot(str(shots / "mlflow-run.png"))


# Picks `value` in the <select> offering `known` (adding it as an option first if it is not
# one), as a user's browser would submit it: the server, not the page, must refuse it.
_SELECT_JS = """const [known, value] = arguments;
const sel = [...document.querySelectorAll('select')].find(s => [...s.options].some(o => o.value === known));
if (!sel) return null;
const options = [...sel.options].map(o => o.value);
if (!options.includes(value)) { const o = document.createElement('option'); o.value = o.textContent = value; sel.appendChild(o); }
sel.value = value; sel.dispatchEvent(new Event('change', {bubbles: true})); sel.scrollIntoView({block: 'center'});
return options;"""


def check_run_form(driver: WebDriver, base_url: str, deployment_id: str, shown: Sequence[str],
                   not_shown: Sequence[str], enum: tuple[str, list[str]], bad: str, error: str, shots: Path) -> None:
    """The deployment's Custom Run form: its sections (and not other paradigms'), a registry field
    as a dropdown of exactly the registered names, and a bad value refused at that field."""
    base = base_url.rstrip("/")
    driver.get(f"{base}/deployments/deployment/{deployment_id}/run")
    wait_shown(driver, shown, shots, "prefect-run-form")
    present = [t for t, hits in zip(not_shown, _find(driver, not_shown)) if hits]
    assert not present, f"the form shows other paradigms' sections: {present}"
    driver.save_screenshot(str(shots / "prefect-run-form.png"))
    known, names = enum
    options = driver.execute_script(_SELECT_JS, known, known)
    assert options == names, f"the {known!r} dropdown offers {options}, not {names}"
    driver.execute_script(_SELECT_JS, known, bad)
    assert _click(driver, "Submit"), "no Submit button on the run form"
    wait_shown(driver, [error], shots, "prefect-run-form-refused")
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", _find(driver, [error])[0][0])
    driver.save_screenshot(str(shots / "prefect-run-form-refused.png"))
    assert driver.current_url.rstrip("/").endswith("/run"), f"the form was submitted: {driver.current_url}"


def check_run_artifacts(driver: WebDriver, base_url: str, flow_run_id: str, table_key: str, plot_key: str,
                        artifact_ids: dict[str, str], row_texts: Sequence[str], shots: Path) -> None:
    """A finished flow run's Artifacts tab lists its results table and plot; each opens and shows."""
    base = base_url.rstrip("/")
    driver.get(f"{base}/runs/flow-run/{flow_run_id}")
    wait_shown(driver, ["Artifacts"], shots, "prefect-run-artifacts")
    _wait(driver, lambda d: _click(d, "Artifacts") and not _missing(d, [table_key, plot_key]), shots,
          "prefect-run-artifacts", lambda: f"not shown: {_missing(driver, [table_key, plot_key])}")
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", _find(driver, [table_key])[0][0])
    driver.save_screenshot(str(shots / "prefect-run-artifacts.png"))
    driver.get(f"{base}/artifacts/artifact/{artifact_ids[table_key]}")
    wait_shown(driver, row_texts, shots, "prefect-run-results")
    driver.save_screenshot(str(shots / "prefect-run-results.png"))
    driver.get(f"{base}/artifacts/artifact/{artifact_ids[plot_key]}")
    _wait(driver, lambda d: d.execute_script(
        "return [...document.images].some(i => i.src.startsWith('data:image/png') && i.naturalWidth > 500)"),
        shots, "prefect-run-plot", lambda: "no accuracy plot image")
    driver.save_screenshot(str(shots / "prefect-run-plot.png"))


def sort_mlflow_runs(driver: WebDriver, base_url: str, experiment_id: str, metric: str,
                     value_of: Callable[[str], float | None], shots: Path, at_least: int = 2) -> None:
    """In the experiment's runs table, sort by a metric through the Sort menu, as a user does; the
    rows (run ids from their links) must then carry `value_of(run id)` in descending order, for at
    least `at_least` runs that have it."""
    driver.get(mlflow_ui_url(experiment_id, base=base_url))

    def sort(d: WebDriver) -> str:
        return next((t for t in d.execute_script("return [...document.querySelectorAll('button')]"
                                                 ".map(b => b.textContent.trim())") if t.startswith("Sort:")), "")
    _wait(driver, sort, shots, "mlflow-sort", lambda: "no Sort menu")
    _click(driver, sort(driver))
    wait_shown(driver, [metric], shots, "mlflow-sort")  # the menu lists every metric
    _click(driver, metric)
    _wait(driver, lambda d: sort(d) == f"Sort: {metric}", shots, "mlflow-sort",
          lambda: f"the table is sorted by {sort(driver)!r}")

    def values(d: WebDriver) -> list[float]:
        ids = d.execute_script(  # in the order the rows are drawn, top to bottom (not DOM order)
            "return [...new Set([...document.querySelectorAll('a')]"
            ".filter(a => /\\/runs\\/[0-9a-f]{32}/.test(a.href) && a.getClientRects().length)"
            ".sort((a, b) => a.getBoundingClientRect().top - b.getBoundingClientRect().top)"
            ".map(a => a.href.match(/\\/runs\\/([0-9a-f]{32})/)[1]))]")
        return [v for v in map(value_of, ids) if v is not None]
    _wait(driver, lambda d: len(v := values(d)) >= at_least and v == sorted(v, reverse=True), shots, "mlflow-sort",
          lambda: f"{metric} down the table: {values(driver)}")
    driver.save_screenshot(str(shots / "mlflow-sorted.png"))


def check_live_run(driver: WebDriver, base_url: str, experiment_id: str, run_id: str, run_name: str,
                   metric: str, shots: Path) -> None:
    """A training round's MLflow run, open while it trains: its page and its live metric chart."""
    driver.get(mlflow_ui_url(experiment_id, run_id, base=base_url))
    wait_shown(driver, [run_name], shots, "mlflow-live")
    _wait(driver, lambda d: _click(d, "Model metrics") and not _missing(d, [metric]), shots, "mlflow-live",
          lambda: f"no chart {metric!r}")
    _wait(driver, lambda d: d.execute_script("return document.querySelectorAll('.js-plotly-plot .scatterlayer path')"
                                             ".length > 0"), shots, "mlflow-live", lambda: "the charts never drew a line")
    driver.save_screenshot(str(shots / "mlflow-live-training.png"))
