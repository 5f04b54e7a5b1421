"""A chapter opened in a real JupyterLab: MyST renders, solutions are folded, and saving leaves git clean.

``tests/test_notebooks.py`` replays what the Lab does to a chapter through jupytext's contents manager;
this test runs the Lab itself. It copies one chapter pair (and ``.gitignore``) from the working tree
into a fresh git repository, starts ``jupyter lab`` headless on a free local port with a token, opens
the chapter in headless Chromium through Playwright, and checks that

- jupyterlab-myst renders every markdown cell: no ``(sec-...)=`` label, ``{ref}``/``{cite}`` role or
  ```` ```{exercise} ```` fence shows as text, and the exercises are rendered as exercise blocks (a
  ``{ref}`` to another chapter shows its label and a ``{cite}`` its key, marked "not found": the Lab
  renders one notebook at a time, without the bibliography);
- every ``{solution}`` (``:class: dropdown``, as sphinx-exercise folds it in the book) is a folded
  ``<details>`` that opens on a click;
- once the kernel has started (the Lab then writes its spec and language into the metadata) and the
  notebook is saved (Ctrl+S, as autosave would), both files of the pair have been rewritten — the
  ``.md`` by jupytext's server extension — and ``git status --porcelain`` is empty.

No cell is executed and nothing leaves the machine. REFIMPL_LAB_SCREENSHOTS, set to a folder, keeps
screenshots there (the chapter's top, its exercises with their solutions folded, one solution opened).
Skipped where Playwright or Chromium is missing, unless REFIMPL_REQUIRE_BROWSER is set, as CI does after
installing Chromium (.ci/run); then it fails.
"""

from __future__ import annotations

import json
import os
import platform
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHAPTER = "06_knowledge_distillation"  # labels, {ref}, {cite}, math, five exercises with solutions
SHOTS = os.environ.get("REFIMPL_LAB_SCREENSHOTS")  # a folder to save screenshots into, if set

# the `browser` fixture (headless Chromium through Playwright) is in tests/conftest.py


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """A git repository holding the chapter pair as the working tree has it, committed."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    repo = tmp_path_factory.mktemp("lab") / "repo"
    (repo / "notebooks").mkdir(parents=True)
    shutil.copy(ROOT / ".gitignore", repo)
    for suffix in (".md", ".ipynb"):
        shutil.copy2(ROOT / "notebooks" / f"{CHAPTER}{suffix}", repo / "notebooks")
    _git(repo, "init", "-q")
    _git(repo, "add", "-A")
    _git(repo, "-c", "user.name=test", "-c", "user.email=test@localhost", "-c", "commit.gpgsign=false",
         "commit", "-q", "-m", "the chapter as committed")
    return repo


@pytest.fixture(scope="module")
def lab(repo, tmp_path_factory):
    """``jupyter lab`` serving ``repo``; yields its base URL and token. Every Jupyter folder it writes to
    (config, runtime, data, user settings, workspaces) is a temporary one; the installed extensions
    (jupytext, jupyterlab-myst) come from the environment's prefix."""
    pytest.importorskip("jupyterlab", reason="jupyterlab is not installed")
    home = tmp_path_factory.mktemp("jupyter")
    settings = home / "settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)
    # no "get notified about Jupyter news?" toast over the notebook (it would fetch nothing offline)
    (settings / "notification.jupyterlab-settings").write_text(json.dumps({"fetchNews": "false"}))
    env = dict(os.environ, JUPYTER_CONFIG_DIR=str(home / "config"), JUPYTER_RUNTIME_DIR=str(home / "runtime"),
               JUPYTER_DATA_DIR=str(home / "data"), JUPYTERLAB_SETTINGS_DIR=str(home / "settings"),
               JUPYTERLAB_WORKSPACES_DIR=str(home / "workspaces"), IPYTHONDIR=str(home / "ipython"))
    port, token = _free_port(), secrets.token_hex(16)
    log_path = home / "server.log"
    with open(log_path, "w") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
             f"--ServerApp.root_dir={repo}", f"--IdentityProvider.token={token}", "--ServerApp.allow_root=True",
             "--LabApp.news_url=", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
             "--LabApp.expose_app_in_browser=True"],  # window.jupyterapp: the test asks it about the kernel
            env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            if server.poll() is not None:
                pytest.fail(f"jupyter lab exited ({server.returncode}):\n{log_path.read_text()[-3000:]}")
            try:
                urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"jupyter lab did not start in 30 s:\n{log_path.read_text()[-3000:]}")
                time.sleep(0.2)
        yield base, token, log_path
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


@pytest.fixture(scope="module")
def notebook(browser, lab):
    """The chapter open in the Lab, every markdown cell rendered, the kernel started and idle."""
    base, token, _ = lab
    page = browser.new_page(viewport={"width": 1366, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(f"{base}/lab/tree/notebooks/{CHAPTER}.ipynb?reset&token={token}")
    stored = json.loads((ROOT / "notebooks" / f"{CHAPTER}.ipynb").read_text(encoding="utf-8"))
    markdown = sum(cell["cell_type"] == "markdown" for cell in stored["cells"])
    # the Lab keeps every cell in the page (its default windowing only skips painting those off screen)
    page.wait_for_function(f"document.querySelectorAll('.jp-Notebook .jp-MarkdownCell').length === {markdown}",
                           timeout=30000)
    page.wait_for_function("document.querySelectorAll('.jp-Notebook .jp-MarkdownCell :is(.myst, .jp-RenderedMarkdown)')"
                           f".length === {markdown}", timeout=30000)
    # the kernel the chapter names has started and answered; the Lab has written its spec and language
    # into the notebook's metadata, as it does for a reader who opens the chapter
    kernel = page.evaluate("""async () => {
        const panel = window.jupyterapp.shell.currentWidget;
        await panel.sessionContext.ready;
        await panel.sessionContext.session.kernel.info;
        await new Promise(resolve => setTimeout(resolve, 500));
        return {spec: panel.model.getMetadata('kernelspec'), language: panel.model.getMetadata('language_info')};
    }""")
    assert kernel["spec"] == stored["metadata"]["kernelspec"]
    assert kernel["language"]["name"] == "python"
    yield page, errors
    page.close()


def _shot(page_or_element, name: str) -> None:
    if SHOTS:
        Path(SHOTS).mkdir(parents=True, exist_ok=True)
        page_or_element.screenshot(path=str(Path(SHOTS) / name))


def test_myst_is_rendered(notebook):
    page, errors = notebook
    # textContent, not innerText: the Lab leaves cells off screen unpainted (content-visibility: auto),
    # and innerText is empty for those
    texts = page.eval_on_selector_all(".jp-Notebook .jp-MarkdownCell :is(.myst, .jp-RenderedMarkdown)",
                                      "els => els.map(e => e.textContent)")
    raw = [marker for marker in ("```{", "{exercise}", "{solution}", "{ref}`", "{cite}`", "(sec-", ":class:")
           if any(marker in text for text in texts)]
    assert not raw, f"MyST shows as text in the Lab: {raw}"
    assert "Knowledge distillation" in texts[0] and "Solution to Exercise" in texts[-1]
    assert not page.eval_on_selector_all(".jp-Notebook .jp-MarkdownCell .jp-RenderedMarkdown", "els => els.length"), (
        "markdown cells rendered by the Lab's default (CommonMark) renderer, not jupyterlab-myst")
    # labels became anchors, a {ref} within the chapter a link titled like its section (one to another
    # chapter shows its label, marked "Cross Reference Not Found"; a {cite} its key, "Citation Not
    # Found": the Lab has neither the other chapters nor the bibliography)
    assert page.locator('.myst h2[id="sec-distillm"]').count() == 1
    link = page.locator('.myst a.hover-link[href="#sec-distilling-step-by-step"]').first
    assert link.text_content() == "Rationale distillation: distilling step-by-step"
    # the exercises are exercise blocks, numbered
    exercises = page.locator("aside.myst-exercise")
    assert exercises.count() == 5
    assert exercises.first.get_attribute("id") == "ex-distillation-offline"
    assert exercises.first.locator(".myst-exercise-title").text_content().strip() == "Exercise 1"
    _shot(page, "chapter_top.png")
    assert not errors, errors


def test_solutions_are_folded(notebook):
    page, _ = notebook
    solutions = page.locator("details.myst-exercise")
    assert solutions.count() == 5, "every {solution} with :class: dropdown should be a <details> block"
    assert solutions.evaluate_all("els => els.filter(e => e.open).length") == 0, "a solution is shown unfolded"
    first = solutions.first
    page.eval_on_selector('.myst h2[id="exercises"]', "e => e.scrollIntoView({block: 'start'})")
    first.locator("summary").wait_for(state="visible", timeout=5000)
    assert first.locator("summary").inner_text().split() == ["Solution", "to", "Exercise", "1"]
    body = first.locator(".details-body")
    assert not body.is_visible()
    _shot(page, "exercises_solutions_folded.png")
    first.locator("summary").click()
    body.wait_for(state="visible", timeout=5000)
    assert "teacher runs once" in body.inner_text()
    _shot(first, "solution_opened.png")
    first.locator("summary").click()  # fold it again: what is open is not saved, but leave it as found
    body.wait_for(state="hidden", timeout=5000)


def test_saving_leaves_the_pair_unchanged(notebook, repo, lab):
    """Ctrl+S saves through jupytext's contents manager: both files are rewritten, git sees no change."""
    page, _ = notebook
    _, _, log_path = lab
    files = [repo / "notebooks" / f"{CHAPTER}{suffix}" for suffix in (".ipynb", ".md")]
    before = [f.stat().st_mtime_ns for f in files]
    page.locator(".jp-Notebook .jp-Cell").first.click()  # command mode on the notebook
    with page.expect_response(lambda r: r.request.method == "PUT" and f"/api/contents/notebooks/{CHAPTER}.ipynb"
                              in r.url, timeout=30000) as response:
        page.keyboard.press("Control+s")
    assert response.value.ok, f"saving failed: {response.value.status}"
    after = [f.stat().st_mtime_ns for f in files]
    log = log_path.read_text()
    assert "Jupytext Server Extension" in log, "the Lab runs without jupytext's contents manager"
    assert after[0] > before[0], "the Lab did not write the notebook"
    assert after[1] > before[1], "jupytext did not write the paired .md (is its server extension enabled?)"
    status = _git(repo, "status", "--porcelain")
    if status:
        stored = json.loads(_git(repo, "show", f"HEAD:notebooks/{CHAPTER}.ipynb"))
        version = stored["metadata"]["language_info"]["version"]
        if status.split() == ["M", f"notebooks/{CHAPTER}.ipynb"] and version != platform.python_version():
            # the Lab writes the reader's own Python version into language_info; nothing else may change
            saved = json.loads(files[0].read_text(encoding="utf-8"))
            stored["metadata"]["language_info"]["version"] = platform.python_version()
            assert saved == stored, f"the Lab rewrote {CHAPTER}.ipynb beyond the Python version"
            return
        diff = _git(repo, "diff")
        pytest.fail(f"opening and saving {CHAPTER} in JupyterLab changes the files:\n{status}\n{diff[:4000]}")
