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
    driver.get(f"{base}/#/experiments")
    search_list(driver, [experiment_name], shots, "mlflow-experiments")
    # MLflow 3 opens experiments in a GenAI view, with an assistant panel: ask for the runs table.
    driver.execute_script("localStorage.setItem('mlflow.workflowType_v1', '\"machine_learning\"');"
                          "localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false');")
    driver.get(f"{base}/#/experiments/{exp_id}/runs?workflowType=machine_learning")
    driver.refresh()  # the app reads the preferences when it starts
    with suppress(TimeoutException):
        WebDriverWait(driver, TIMEOUT / 2, 0.5).until(lambda d: not _missing(d, [run_name]))
    if _missing(driver, [run_name]):  # a modal, or still the GenAI view
        _click(driver, *_POPUPS, "Model training", "Machine learning", "Machine Learning")
    wait_shown(driver, [experiment_name, run_name], shots, "mlflow-experiment")
    _click(driver, *_POPUPS)
    driver.save_screenshot(str(shots / "mlflow-experiment.png"))
    driver.get(f"{base}/#/experiments/{exp_id}/runs/{runs[0]['info']['run_id']}")
    wait_shown(driver, [run_name], shots, "mlflow-run")
    search_list(driver, metric_names, shots, "mlflow-run")
    for hits in _find(driver, metric_names[:1]):
        driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", hits[0])
    driver.save_screenshot(str(shots / "mlflow-run.png"))
