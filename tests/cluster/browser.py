"""A person at KFP's UI: headless Chromium (Debian's ``chromium`` and ``chromium-driver``) driven by Selenium.

What the Kubeflow gateway and central dashboard do for a browser, the browser does here: every
request carries the ``kubeflow-userid`` header of the signed-in person (Chrome DevTools'
``Network.setExtraHTTPHeaders``), and the dashboard's namespace picker (``window.centraldashboard``,
which KFP's UI asks for its namespace in multi-user mode) selects the profile's namespace. The UI,
its server and everything behind them are KFP's own.

Every wait is on what the page shows, bounded; :meth:`Browser.evidence` keeps a screenshot and the
console log of the page a test was on.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

CHROMIUM, DRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
USER_HEADER = "kubeflow-userid"
# The central dashboard's client library, as the UI calls it: init(callback(handler, iframed)),
# then handler.onNamespaceSelected(namespace) when the person picks one.
_DASHBOARD = """
window.centraldashboard = {CentralDashboardEventHandler: {init: function (cb) {
  var handler = {}; cb(handler, true);
  setTimeout(function () { if (handler.onNamespaceSelected) handler.onNamespaceSelected(%s); }, 0);
}}};
"""


def available() -> None:
    """Skips with the line that says what to install when the browser is not there."""
    if not (Path(CHROMIUM).exists() and Path(DRIVER).exists()):
        pytest.skip("no chromium / chromium-driver: make cluster-build installs them (Debian's packages)")
    pytest.importorskip("selenium", reason="selenium is in the dev extra: make install")


class Browser:
    """One headless Chromium signed in as ``user`` with ``namespace`` selected."""

    def __init__(self, base: str, user: str, namespace: str, shots: Path) -> None:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,900", "--hide-scrollbars"):
            options.add_argument(arg)
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        self.driver = webdriver.Chrome(service=Service(DRIVER), options=options)
        self.driver.execute_cdp_cmd("Network.enable", {})
        self.driver.execute_cdp_cmd("Network.setExtraHTTPHeaders", {"headers": {USER_HEADER: user}})
        self.driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": _DASHBOARD % json.dumps(namespace)})
        self.base, self.shots = base.rstrip("/"), shots
        shots.mkdir(parents=True, exist_ok=True)

    def close(self) -> None:
        self.driver.quit()

    # What a person does.
    def open(self, route: str) -> None:
        self.driver.get(f"{self.base}/#/{route.lstrip('#/')}")

    def text(self) -> str:
        return self.driver.find_element("tag name", "body").text

    def wait(self, what: str, ready: Callable[[], Any], timeout: float = 60, every: float = 0.5, between: Callable[[], None] | None = None) -> Any:
        """``ready()``'s first true value, polled every ``every`` seconds for ``timeout`` (``between`` runs between polls)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                value = ready()
            except Exception:  # an element replaced while it was read: poll again
                value = None
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"the page did not show {what} in {timeout:.0f} s (screenshot and console log: {self.evidence('timeout')})")
            if between is not None:
                between()
            time.sleep(every)

    def wait_text(self, text: str, timeout: float = 60) -> None:
        self.wait(repr(text), lambda: text in self.text(), timeout)

    def element(self, xpath: str, timeout: float = 30) -> Any:
        def shown() -> Any:
            for e in self.driver.find_elements("xpath", xpath):
                if e.is_displayed() and e.is_enabled():
                    return e
            return None

        return self.wait(f"an element {xpath}", shown, timeout)

    def click(self, text: str, timeout: float = 30) -> None:
        """Clicks what shows exactly ``text`` (a button, a link, a tab, a row's name)."""
        literal = json.dumps(text)
        e = self.element(f"//*[normalize-space(text())={literal} or normalize-space(.)={literal}][not(*[normalize-space(.)={literal}])]", timeout)
        self.driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", e)
        e.click()

    def press(self, element: Any) -> None:
        """A person's click on ``element`` as its page sees one: pointer and mouse down, up, then click, at its
        centre, sent to it even where a panel covers it. The graph's nodes (React Flow, draggable) open
        their side panel on that sequence, not on a bare ``click`` event."""
        self.driver.execute_script(
            """const el = arguments[0], r = el.getBoundingClientRect();
            const at = {bubbles: true, cancelable: true, view: window, clientX: r.x + r.width / 2, clientY: r.y + r.height / 2, button: 0};
            for (const type of ['pointerdown', 'mousedown', 'pointerup', 'mouseup', 'click']) {
              el.dispatchEvent(type.startsWith('pointer') ? new PointerEvent(type, at) : new MouseEvent(type, at));
            }""",
            element,
        )

    def field(self, label: str) -> Any:
        """The input of the text field labelled ``label`` (a Material UI TextField: the label names its input's id;
        where it names none, as KFP 2.15's recurring run name, the input beside it in the field)."""
        literal = json.dumps(label)
        box = self.element(f"//label[starts-with(normalize-space(.), {literal})]")
        target = box.get_attribute("for")
        if target:
            return self.driver.find_element("id", target)
        return box.find_element("xpath", "./..//input | ./..//textarea")

    def fill(self, label: str, value: str) -> None:
        from selenium.webdriver.common.keys import Keys

        box = self.field(label)
        self.driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", box)
        box.send_keys(Keys.CONTROL, "a")
        box.send_keys(Keys.DELETE)
        box.send_keys(value)

    def upload(self, path: Path) -> None:
        self.driver.find_element("xpath", "//input[@type='file']").send_keys(str(path))

    # What it leaves behind.
    def shot(self, name: str) -> Path:
        path = self.shots / f"{name}.png"
        self.driver.save_screenshot(str(path))
        return path

    def evidence(self, name: str) -> Path:
        """A screenshot and the console log of the page now, beside the shots; returns the screenshot's path."""
        path = self.shot(f"failed-{name}")
        try:
            log = "\n".join(f"{e['level']} {e['message']}" for e in self.driver.get_log("browser"))
        except Exception as exc:  # the log is evidence, never the failure
            log = f"(no console log: {exc})"
        path.with_suffix(".console.txt").write_text(f"{self.driver.current_url}\n{log}\n")
        return path


def publish(shots: Path, names: dict[str, str], to: Path) -> None:
    """Copies the chosen screenshots (shot name -> file name in ``to``) where the docs show them."""
    to.mkdir(parents=True, exist_ok=True)
    for shot, name in names.items():
        shutil.copyfile(shots / f"{shot}.png", to / name)
