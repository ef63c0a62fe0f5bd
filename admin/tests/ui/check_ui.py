#!/usr/bin/env python3
"""Drive the ClaudeFS admin web UI (admin/ui) in headless Chromium and check
that it shows what the caller expects.

Usage:
  python3 check_ui.py --url http://127.0.0.1:PORT --token TOKEN --expect expect.json [--shots DIR]
  python3 check_ui.py --url https://node.cfs.internal:PORT --ca DIR/tls/ca.crt \
      --resolve node.cfs.internal:127.0.0.1 --token TOKEN --expect expect.json

With --ca the gateway's certificate is checked against the cluster's CA
and Chromium is told to trust exactly that certificate's key
(--ignore-certificate-errors-spki-list), nothing else.

expect.json (computed by the caller from the mount):
  {"top_users": {"alice": 123, ...},        owner_name -> bytes
   "types": {"h5": 456, "": 7, ...},        file_type -> bytes ("" or "(none)" = no type)
   "dirs_depth1": {"/a": 789, ...},         top-level directory -> bytes
   "find_h5": ["/a/x.h5", ...],             paths matched by the name pattern *.h5
   "nodes": 3}                              number of nodes

Prints one PASS/FAIL line per check and exits 1 if any check failed
(2 if the browser could not be started). Needs `selenium` (pip install
selenium), /usr/bin/chromium and /usr/bin/chromedriver.

What it relies on in the page (admin/ui/app.js):
  body[data-loaded] = route name once a view has loaded ("login" for the
  sign-in form), body[data-error] = message on an error; both are cleared
  when a load starts. Tables are <table class="results" id=...> with
  <thead><th data-col=NAME> and <tbody> rows whose cells hold the server's
  raw value in data-value.
"""
import argparse
import json
import os
import sys
import time

from selenium import webdriver
from selenium.common.exceptions import TimeoutException, WebDriverException
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import cfs_https  # noqa: E402

READ_TABLE_JS = """
const t = document.getElementById(arguments[0]);
if (!t) return null;
const cols = [...t.querySelectorAll('thead th')].map(th => th.dataset.col ?? th.textContent);
const rows = [...t.querySelectorAll('tbody tr')].map(tr => [...tr.cells].map(td => [
  td.hasAttribute('data-value') ? td.getAttribute('data-value') : null, td.textContent]));
return {cols, rows};
"""

FETCH_JS = """
const done = arguments[arguments.length - 1];
fetch(arguments[0], {credentials: 'same-origin'})
  .then(async r => done({status: r.status, text: await r.text(),
    ctype: r.headers.get('content-type'),
    ts: r.headers.get('x-cfs-index-timestamp'), lag: r.headers.get('x-cfs-index-lag-seconds')}))
  .catch(e => done({status: -1, text: String(e)}));
"""

STATE_JS = "return [document.body.dataset.loaded || '', document.body.dataset.error || ''];"
CLEAR_JS = "delete document.body.dataset.loaded; delete document.body.dataset.error;"
CHART_JS = ("const c = document.getElementById(arguments[0]);"
            "return !!(c && window.Chart && window.Chart.getChart(c));")

# console lines that are expected: the API answers 401 before sign-in and on
# a wrong token, 400 to refused SQL, 408 to cancelled queries
EXPECTED_CONSOLE = ("status of 401", "status of 400", "status of 408")


class Checks:
    def __init__(self):
        self.failed = 0
        self.passed = 0

    def check(self, name, ok, detail=""):
        if ok:
            self.passed += 1
        else:
            self.failed += 1
        line = f"{'PASS' if ok else 'FAIL'} {name}"
        if detail and detail != "[]":
            line += f": {detail}"
        print(line, flush=True)
        return ok


def short(x, n=300):
    s = repr(x) if not isinstance(x, str) else x
    return s if len(s) <= n else s[: n - 3] + "..."


def diff_maps(got, want):
    """'' if equal, else a short description of the differences."""
    parts = []
    missing = [k for k in want if k not in got]
    extra = [k for k in got if k not in want]
    wrong = [(k, got[k], want[k]) for k in want if k in got and got[k] != want[k]]
    if missing:
        parts.append(f"missing {short(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    if extra:
        parts.append(f"unexpected {short(extra[:5])}{' ...' if len(extra) > 5 else ''}")
    if wrong:
        parts.append("wrong " + short([f"{k!r}: got {g} want {w}" for k, g, w in wrong[:5]]))
    return "; ".join(parts)


class UI:
    def __init__(self, args):
        self.args = args
        self.url = args.url.rstrip("/")
        opts = Options()
        opts.binary_location = args.chromium
        for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                  "--window-size=1400,1000", "--lang=en-US"):
            opts.add_argument(a)
        if args.resolve:
            host, ip = args.resolve.split(":", 1)
            opts.add_argument(f"--host-resolver-rules=MAP {host} {ip}")
        if args.ca:
            opts.add_argument(f"--ignore-certificate-errors-spki-list={args.pin}")
        opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        self.d = webdriver.Chrome(service=Service(executable_path=args.chromedriver), options=opts)
        self.d.set_script_timeout(args.timeout)
        self.shot_n = 0

    def quit(self):
        try:
            self.d.quit()
        except WebDriverException:
            pass

    def js(self, script, *a):
        return self.d.execute_script(script, *a)

    def el(self, id_):
        return self.d.find_element(By.ID, id_)

    def act_and_wait(self, route, action):
        """Clear the page's load state, run action(), wait for body[data-loaded]
        == route or body[data-error]. Returns (loaded, error)."""
        self.js(CLEAR_JS)
        action()
        try:
            WebDriverWait(self.d, self.args.timeout, poll_frequency=0.1).until(
                lambda d: (lambda s: s[0] == route or s[1])(d.execute_script(STATE_JS)))
        except TimeoutException:
            pass
        loaded, error = self.js(STATE_JS)
        return loaded == route, error

    def goto(self, route):
        """Open a view by clicking its nav link."""
        link = self.d.find_element(By.CSS_SELECTOR, f'#nav a[data-route="{route}"]')
        return self.act_and_wait(route, link.click)

    def table(self, id_):
        """(columns, [{col: data-value}], [{col: text}]) of a results table."""
        t = self.js(READ_TABLE_JS, id_)
        if t is None:
            return None, [], []
        cols = t["cols"]
        vals = [dict(zip(cols, (c[0] for c in r))) for r in t["rows"]]
        texts = [dict(zip(cols, (c[1] for c in r))) for r in t["rows"]]
        return cols, vals, texts

    def fetch(self, path):
        return self.d.execute_async_script(FETCH_JS, path)

    def has_chart(self, id_):
        return bool(self.js(CHART_JS, id_))

    def shot(self, name):
        if not self.args.shots:
            return
        os.makedirs(self.args.shots, exist_ok=True)
        self.shot_n += 1
        h = self.js("return Math.max(document.documentElement.scrollHeight, 1000);")
        self.d.set_window_size(1400, min(int(h), 6000))
        self.d.save_screenshot(os.path.join(self.args.shots, f"{self.shot_n:02d}-{name}.png"))
        self.d.set_window_size(1400, 1000)

    def freshness(self):
        try:
            return self.el("index-freshness").text
        except WebDriverException:
            return ""


def bytes_map(c, ui, table_id, key_col, norm=lambda k: k):
    """{key: bytes} read from a table, failing on missing columns or duplicate keys."""
    cols, vals, _ = ui.table(table_id)
    if not c.check(f"{table_id} has columns {key_col}, bytes",
                   cols is not None and key_col in cols and "bytes" in cols, f"columns {cols}"):
        return None
    got, dups = {}, []
    for r in vals:
        k = norm(r.get(key_col) if r.get(key_col) is not None else "")
        if k in got:
            dups.append(k)
        try:
            got[k] = int(r.get("bytes"))
        except (TypeError, ValueError):
            got[k] = r.get("bytes")
    c.check(f"{table_id} has no duplicate {key_col}", not dups, short(dups))
    return got


def norm_dir(p):
    p = p.strip()
    if not p.startswith("/"):
        p = "/" + p
    return p.rstrip("/") or "/"


def run(c, ui, expect, token):
    # --- sign-in form --------------------------------------------------
    ok, err = ui.act_and_wait("login", lambda: ui.d.get(ui.url + "/"))
    form_shown = ok and ui.el("login-form").is_displayed()
    c.check("login form shown without a session", form_shown, err or ui.js(STATE_JS)[0])
    ui.shot("login")
    if not form_shown:
        return
    c.check("no nodes shown before sign-in", not ui.table("nodes-table")[1])

    # --- wrong token -----------------------------------------------------
    def submit(tok):
        box = ui.el("login-token")
        box.clear()
        box.send_keys(tok)
        ui.el("login-submit").click()

    wrong = "not-" + token + "-x"
    _, err = ui.act_and_wait("overview", lambda: submit(wrong))
    loaded = ui.js(STATE_JS)[0]
    msg = ui.el("login-error").text if ui.el("login-error").is_displayed() else ""
    c.check("wrong token: error shown", bool(err) and bool(msg), f"error={err!r} shown={msg!r}")
    c.check("wrong token: no data shown", loaded != "overview" and not ui.table("nodes-table")[1]
            and ui.el("login-form").is_displayed(), f"loaded={loaded!r}")
    r = ui.fetch("api/overview")
    c.check("wrong token: API still answers 401", r["status"] == 401, f"status {r['status']}")
    ui.shot("login-wrong-token")

    # --- sign in, overview ---------------------------------------------------
    ok, err = ui.act_and_wait("overview", lambda: submit(token))
    if not c.check("sign-in with the token loads the overview", ok and not err, err):
        return
    _, vals, texts = ui.table("nodes-table")
    c.check(f"overview: {expect['nodes']} node rows in #nodes-table", len(vals) == expect["nodes"],
            f"{len(vals)} rows")
    bad = [t_.get("health") for t_ in texts if t_.get("health") not in ("ok", "degraded", "down")]
    c.check("overview: every node has a health", not bad, short(bad))
    c.check("overview: #capacity-chart is a chart", ui.has_chart("capacity-chart"))
    c.check("overview: cluster health shown", ui.el("cluster-health").text.strip() != "")
    fr = ui.freshness()
    c.check("overview: #index-freshness says 'behind'", "behind" in fr and "index as of" in fr, fr)
    ui.shot("overview")

    # --- top users --------------------------------------------------------------
    ok, err = ui.goto("users")
    if c.check("users view loads", ok and not err, err):
        got = bytes_map(c, ui, "users-table", "owner_name")
        if got is not None:
            want = {k: int(v) for k, v in expect["top_users"].items()}
            d = diff_maps(got, want)
            c.check(f"users-table equals top_users ({len(want)} users)", not d, d)
        c.check("users: #users-chart is a chart", ui.has_chart("users-chart"))
        c.check("users: #index-freshness says 'behind'", "behind" in ui.freshness(), ui.freshness())
    ui.shot("users")

    # --- file types ----------------------------------------------------------
    ok, err = ui.goto("types")
    if c.check("types view loads", ok and not err, err):
        none = lambda k: "" if k in ("", "(none)") else k  # noqa: E731
        got = bytes_map(c, ui, "types-table", "file_type", none)
        if got is not None:
            want = {none(k): int(v) for k, v in expect["types"].items()}
            d = diff_maps(got, want)
            c.check(f"types-table equals types ({len(want)} types)", not d, d)
            if "" in want:
                _, vals, texts = ui.table("types-table")
                shown = [tx["file_type"] for v, tx in zip(vals, texts) if not v.get("file_type")]
                c.check("types: empty file_type shown as (none)", shown == ["(none)"], short(shown))
        c.check("types: #types-chart is a chart", ui.has_chart("types-chart"))
        c.check("types: #index-freshness says 'behind'", "behind" in ui.freshness(), ui.freshness())
    ui.shot("types")

    # --- largest directories -------------------------------------------------
    ok, err = ui.goto("dirs")
    if c.check("dirs view loads", ok and not err, err):
        depth = ui.el("dirs-depth").get_attribute("value")
        c.check("dirs: depth defaults to 2", depth == "2", f"depth {depth!r}")
        ui.shot("dirs-depth2")
        ok, err = ui.act_and_wait("dirs", lambda: Select(ui.el("dirs-depth")).select_by_value("1"))
        if c.check("dirs: depth 1 loads", ok and not err, err):
            got = bytes_map(c, ui, "dirs-table", "dir", norm_dir)
            if got is not None:
                want = {norm_dir(k): int(v) for k, v in expect["dirs_depth1"].items()}
                d = diff_maps(got, want)
                c.check(f"dirs-table at depth 1 equals dirs_depth1 ({len(want)} dirs)", not d, d)
            c.check("dirs: #dirs-chart is a chart", ui.has_chart("dirs-chart"))
            c.check("dirs: #index-freshness says 'behind'", "behind" in ui.freshness(), ui.freshness())
        ui.shot("dirs-depth1")

    # --- stale data ------------------------------------------------------
    ok, err = ui.goto("stale")
    if c.check("stale view loads", ok and not err, err):
        days = ui.el("stale-days").get_attribute("value")
        c.check("stale: days defaults to 180", days == "180", f"days {days!r}")
        cols, vals, _ = ui.table("stale-table")
        c.check("stale: #stale-table has a header", bool(cols), f"columns {cols}, {len(vals)} rows")
        c.check("stale: #index-freshness says 'behind'", "behind" in ui.freshness(), ui.freshness())
    ui.shot("stale")

    # --- search ------------------------------------------------------------
    ok, err = ui.goto("search")
    if c.check("search view loads", ok and not err, err):
        def search():
            box = ui.el("search-pattern")
            box.clear()
            box.send_keys("*.h5")
            ui.el("search-run").click()

        ok, err = ui.act_and_wait("search", search)
        if c.check("search: *.h5 loads", ok and not err, err):
            cols, vals, _ = ui.table("search-table")
            if c.check("search-table has a path column", cols is not None and "path" in cols, f"columns {cols}"):
                got = sorted(r["path"] or "" for r in vals)
                want = sorted(expect["find_h5"])
                missing = sorted(set(want) - set(got))
                extra = sorted(set(got) - set(want))
                c.check(f"search-table lists exactly find_h5 ({len(want)} paths)", got == want,
                        f"{len(got)} rows; missing {short(missing[:5])}; unexpected {short(extra[:5])}")
            n = ui.js("return document.querySelectorAll('table.results img, table.results script').length;")
            c.check("search: no markup from file names in the page", n == 0, f"{n} elements")
            c.check("search: #index-freshness says 'behind'", "behind" in ui.freshness(), ui.freshness())
        ui.shot("search")

    # --- SQL console ----------------------------------------------------------
    ok, err = ui.goto("sql")
    if not c.check("sql view loads", ok and not err, err):
        return

    def sql(text):
        def act():
            box = ui.el("sql-input")
            box.clear()
            box.send_keys(text)
            ui.el("sql-run").click()
        return ui.act_and_wait("sql", act)

    def count_ok(label):
        ok, err = sql("SELECT count(*) AS n FROM files")
        if not c.check(f"sql: {label} runs", ok and not err, err):
            return
        cols, vals, _ = ui.table("sql-table")
        n = vals[0].get("n") if len(vals) == 1 else None
        c.check(f"sql: {label} gives one row with n", cols == ["n"] and n is not None and n.isdigit(),
                f"columns {cols}, rows {short(vals)}")

    count_ok("SELECT count(*) AS n FROM files")
    c.check("sql: no error shown after a good query", not ui.el("sql-error").is_displayed(),
            ui.el("sql-error").text)
    c.check("sql: #index-freshness says 'behind'", "behind" in ui.freshness(), ui.freshness())
    href = ui.el("sql-csv").get_attribute("href") or ""
    if c.check("sql: #sql-csv href has format=csv", "format=csv" in href and "sql=" in href, href):
        r = ui.fetch(href)
        first = r["text"].splitlines()[0].strip() if r.get("text") else ""
        c.check("sql: CSV download answers 200 with header row 'n'", r["status"] == 200 and first == "n",
                f"status {r['status']} first line {first!r} content-type {r.get('ctype')!r}")
        c.check("sql: CSV download has X-Cfs-Index-Timestamp and -Lag-Seconds", bool(r.get("ts")) and
                r.get("lag") is not None, f"ts {r.get('ts')!r} lag {r.get('lag')!r}")
    ui.shot("sql-count")

    ok, err = sql("DROP TABLE files")
    shown = ui.el("sql-error").text.strip() if ui.el("sql-error").is_displayed() else ""
    c.check("sql: DROP TABLE files is refused and #sql-error shows why", bool(err) and bool(shown),
            f"error={err!r} shown={shown!r}")
    c.check("sql: no result rows after the refusal", not ui.table("sql-table")[1])
    ui.shot("sql-drop")
    count_ok("files still there: count")

    # --- sign out -------------------------------------------------------------
    ok, err = ui.act_and_wait("login", lambda: ui.el("logout").click())
    c.check("logout shows the sign-in form", ok and ui.el("login-form").is_displayed(), err)
    r = ui.fetch("api/overview")
    c.check("after logout the API answers 401", r["status"] == 401, f"status {r['status']}")
    c.check("after logout no data shown", not ui.table("nodes-table")[1] and not ui.table("sql-table")[1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", required=True, help="gateway base URL, e.g. http://127.0.0.1:8080")
    ap.add_argument("--token", required=True, help="admin token")
    ap.add_argument("--expect", required=True, help="JSON file of what the page must show")
    ap.add_argument("--shots", help="directory for one screenshot per view")
    ap.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for a view (30)")
    ap.add_argument("--ca", help="the cluster's CA certificate (the gateway is HTTPS)")
    ap.add_argument("--resolve", help="HOST:IP, the gateway certificate's name and its address")
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    ap.add_argument("--chromedriver", default="/usr/bin/chromedriver")
    args = ap.parse_args()
    with open(args.expect) as f:
        expect = json.load(f)
    for k in ("top_users", "types", "dirs_depth1", "find_h5", "nodes"):
        if k not in expect:
            sys.exit(f"check_ui: {args.expect} has no {k!r}")

    c = Checks()
    if args.resolve:
        cfs_https.resolve(*args.resolve.split(":", 1))
    if args.ca:
        try:
            args.pin = cfs_https.spki_pin(args.url, args.ca)
        except OSError as e:
            print(f"FAIL the gateway's certificate checked against {args.ca}: {e}", flush=True)
            return 1
        c.check("the gateway's certificate is of the cluster's CA", True, args.pin)
    try:
        ui = UI(args)
    except WebDriverException as e:
        print(f"FAIL start headless chromium: {e}", flush=True)
        return 2
    start = time.monotonic()
    try:
        run(c, ui, expect, args.token)
    except Exception as e:  # a broken page must be reported, not crash the run
        c.check("UI run finished without an exception", False, f"{type(e).__name__}: {short(str(e), 500)}")
        try:
            ui.shot("exception")
        except WebDriverException:
            pass
    try:
        logs = ui.d.get_log("browser")
        bad = [e["message"] for e in logs if e.get("level") == "SEVERE"
               and not any(x in e["message"] for x in EXPECTED_CONSOLE)]
        c.check("no unexpected errors in the browser console", not bad, short(bad[:5], 800))
    except WebDriverException as e:
        print(f"(browser console not available: {e})")
    ui.quit()
    print(f"{c.passed} passed, {c.failed} failed in {time.monotonic() - start:.1f} s", flush=True)
    return 1 if c.failed else 0


if __name__ == "__main__":
    sys.exit(main())
