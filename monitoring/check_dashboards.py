#!/usr/bin/env python3
"""Checks the ClaudeFS Grafana dashboards against the metric catalog and a live Prometheus.

  check_dashboards.py lint DIR [--rules RULES_DIR] [--catalog METRICS_MD]
      Every dashboard in DIR parses and has a uid and a title; every panel
      has targets with an `expr`; every metric an expression names is `up`,
      a `claudefs:` recording rule defined in RULES_DIR, or a family of the
      catalog (the tables of docs/metrics.md; histograms as `_bucket`,
      `_sum`, `_count`), with only that family's labels (plus `instance`,
      `job`, and `le` on `_bucket`) in its selectors; recording rules are
      referenced without selectors; rate(), irate() and increase() windows
      are `$__rate_interval` (increase() may also use `$__range`); every
      template variable an expression uses is defined; the datasource is
      the `datasource` variable. The expressions of the rule files in
      RULES_DIR are held to the same catalog.

  check_dashboards.py live PROM_URL DIR [RULES_DIR] [--allow-empty REGEX]...
      Runs every panel expression (and every template variable query) as an
      instant query against the Prometheus at PROM_URL and prints one line
      per expression: `ok`, `EMPTY` (no sample, or only NaN) or `ERROR`,
      with the dashboard, panel title and query. Exits 1 if any is not ok.
      Variables are substituted first: $__rate_interval -> 1m,
      $__interval -> 30s, $__range -> 5m, and a variable in a label matcher
      (`label=~"$instance"`, `label="$x"`) -> `=~".+"`. With RULES_DIR,
      `claudefs:` recording rules are replaced by their expressions, so a
      Prometheus that has not loaded (or not yet evaluated) the rules
      answers too (a range over a rule becomes a subquery with a 10s step).
      --allow-empty REGEX (repeatable) accepts EMPTY for an expression whose
      panel title or expression matches REGEX.

  check_dashboards.py exprs DIR [RULES_DIR] [--raw]
      Prints every expression `live` would send, one per line, in dashboard
      order, without duplicates (--raw: as written in the dashboards).

  check_dashboards.py metrics DIR [RULES_DIR]
      Prints every catalog family the dashboards read (through recording
      rules too, given RULES_DIR), one per line, sorted.

Defaults: RULES_DIR for lint is prometheus/rules next to this script; the
catalog is docs/metrics.md of the repository holding this script.
Python 3 standard library only.
"""

import argparse
import glob
import json
import math
import os
import re
import sys
import urllib.error
import urllib.parse
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_RULES = os.path.join(HERE, "prometheus", "rules")
DEFAULT_CATALOG = os.path.join(HERE, "..", "docs", "metrics.md")

# Labels every scraped series carries.
TARGET_LABELS = {"instance", "job"}
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right",
    "and", "or", "unless", "atan2", "bool", "offset", "inf", "nan",
}
GROUPING = {"by", "without", "on", "ignoring", "group_left", "group_right"}
AGGREGATIONS = {
    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count",
    "count_values", "bottomk", "topk", "quantile",
}
# What `live` puts in place of Grafana's built-in variables.
BUILTINS = {
    "__rate_interval": "1m",
    "__interval": "30s",
    "__interval_ms": "30000",
    "__range": "5m",
    "__range_s": "300",
    "__range_ms": "300000",
}
VAR_RE = re.compile(r"\$\{(\w+)(?::[\w]+)?\}|\$(\w+)|\[\[(\w+)(?::[\w]+)?\]\]")


# ---- the catalog and the rules ----------------------------------------------

class Family:
    def __init__(self, name, kind, labels):
        self.name = name
        self.kind = kind
        self.labels = labels


def load_catalog(path):
    """Families of the markdown tables whose first header cell is `name`."""
    families = {}
    in_table = False
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line.startswith("|"):
                in_table = False
                continue
            cells = [c.strip() for c in line.strip("|").split("|")]
            if cells and cells[0] == "name":
                in_table = True
                continue
            if not in_table or set(cells[0]) <= set("-: "):
                continue
            m = re.fullmatch(r"`([A-Za-z_:][A-Za-z0-9_:]*)`", cells[0])
            if not m:
                continue  # e.g. "(the other `claudefs_meta_*_total` counters)"
            kind = cells[1].split()[0] if len(cells) > 1 and cells[1] else ""
            labels_cell = re.sub(r"\([^)]*\)", "", cells[2]) if len(cells) > 2 else ""
            labels = set(re.findall(r"`(\w+)`", labels_cell))
            families[m.group(1)] = Family(m.group(1), kind, labels)
    return families


def load_yaml_rules(rules_dir):
    """{record name: expr} and [(file, name, expr)] of every rule, from the
    rule files in rules_dir. The files are YAML; this reads the subset they
    use (`record:`/`alert:` followed by `expr:`, plain or block scalars)."""
    records = {}
    rules = []
    for path in sorted(glob.glob(os.path.join(rules_dir, "*.yml")) + glob.glob(os.path.join(rules_dir, "*.yaml"))):
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
        name = None
        is_record = False
        i = 0
        while i < len(lines):
            line = lines[i]
            m = re.match(r"^\s*-?\s*(record|alert):\s*(\S.*?)\s*$", line)
            if m:
                is_record = m.group(1) == "record"
                name = m.group(2).strip("'\"")
                i += 1
                continue
            m = re.match(r"^(\s*)expr:\s*(.*?)\s*$", line)
            if m and name:
                indent = len(m.group(1))
                value = m.group(2)
                if value in ("|", ">", "|-", ">-", "|+", ">+"):
                    body = []
                    i += 1
                    while i < len(lines) and (not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > indent):
                        body.append(lines[i].strip())
                        i += 1
                    expr = " ".join(b for b in body if b)
                else:
                    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
                        value = value[1:-1]
                        if m.group(2).startswith("'"):
                            value = value.replace("''", "'")
                    expr = value
                    i += 1
                expr = re.sub(r"\s+", " ", expr).strip()
                rules.append((path, name, expr))
                if is_record:
                    records[name] = expr
                name = None
                continue
            i += 1
    return records, rules


# ---- a small PromQL lexer -----------------------------------------------------

TOKEN_RE = re.compile(r"""
    (?P<ws>\s+)
  | (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
  | (?P<var>\$\{\w+(?::\w+)?\}|\$\w+|\[\[\w+(?::\w+)?\]\])
  | (?P<number>(?:0[xX][0-9a-fA-F]+|\d+(?:\.\d*)?(?:[eE][+-]?\d+)?|\.\d+(?:[eE][+-]?\d+)?)(?:[smhdwy]|ms)?(?:\d+(?:ms|[smhdwy]))*)
  | (?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)
  | (?P<op>=~|!~|==|!=|>=|<=|[-+*/%^<>=,(){}\[\]:@])
""", re.VERBOSE)


def lex(expr):
    """[(kind, text, start, end)] without whitespace; raises ValueError."""
    out = []
    pos = 0
    while pos < len(expr):
        m = TOKEN_RE.match(expr, pos)
        if not m:
            raise ValueError(f"cannot read {expr[pos:pos + 20]!r}")
        kind = m.lastgroup
        if kind != "ws":
            out.append((kind, m.group(), m.start(), m.end()))
        pos = m.end()
    return out


class Scan:
    """What an expression references."""

    def __init__(self):
        self.selectors = []   # (metric name, {label names}, start, end of name)
        self.ranges = []      # (innermost enclosing function or None, range text)
        self.variables = set()
        self.problems = []


def scan(expr):
    s = Scan()
    try:
        toks = lex(expr)
    except ValueError as e:
        s.problems.append(str(e))
        return s
    stack = []  # function name (or None) of every open parenthesis
    pending = None  # an aggregation whose `by (...)` came before its argument
    i = 0
    n = len(toks)
    while i < n:
        kind, text, start, end = toks[i]
        nxt = toks[i + 1][1] if i + 1 < n else None
        if kind == "ident" and text in AGGREGATIONS and nxt in ("by", "without"):
            pending = text
            i += 1
            continue
        if kind in ("var", "string"):
            for m in VAR_RE.finditer(text):
                s.variables.add(m.group(1) or m.group(2) or m.group(3))
        elif kind == "ident":
            low = text.lower()
            if low in GROUPING and nxt == "(":
                # A label list: skip to its closing parenthesis.
                j = i + 2
                while j < n and toks[j][1] != ")":
                    j += 1
                i = j + 1
                continue
            if low in KEYWORDS:
                pass
            elif nxt == "(":
                stack.append(text)
                i += 2
                continue
            else:
                labels = set()
                j = i + 1
                if nxt == "{":
                    j = i + 2
                    while j < n and toks[j][1] != "}":
                        if toks[j][0] == "ident":
                            labels.add(toks[j][1])
                        elif toks[j][0] == "string":
                            for m in VAR_RE.finditer(toks[j][1]):
                                s.variables.add(m.group(1) or m.group(2) or m.group(3))
                        j += 1
                    j += 1
                s.selectors.append((text, labels, start, end))
                i = j
                continue
        elif text == "{":
            s.problems.append("a selector without a metric name")
            while i < n and toks[i][1] != "}":
                i += 1
        elif text == "(":
            stack.append(pending)
            pending = None
        elif text == ")":
            if stack:
                stack.pop()
        elif text == "[":
            j = i + 1
            while j < n and toks[j][1] != "]":
                j += 1
            inner = expr[end:toks[j][2]] if j < n else expr[end:]
            for m in VAR_RE.finditer(inner):
                s.variables.add(m.group(1) or m.group(2) or m.group(3))
            s.ranges.append((stack[-1] if stack else None, inner.strip()))
            i = j + 1
            continue
        i += 1
    return s


def family_of(name, catalog):
    """(family, problem): the catalog family a series name belongs to."""
    if name in catalog:
        fam = catalog[name]
        if fam.kind == "histogram":
            return fam, f"{name} is a histogram: read {name}_bucket, _sum or _count"
        return fam, None
    for suffix in HISTOGRAM_SUFFIXES:
        if name.endswith(suffix):
            base = name[: -len(suffix)]
            fam = catalog.get(base)
            if fam and fam.kind == "histogram":
                return fam, None
    return None, f"{name} is not in the catalog (docs/metrics.md)"


def check_expr(expr, catalog, records, where, dashboard=True, variables=None):
    """Problems of one expression, as strings."""
    problems = []
    s = scan(expr)
    problems.extend(s.problems)
    for name, labels, _, _ in s.selectors:
        if name == "up":
            allowed = TARGET_LABELS
        elif name.startswith("claudefs:"):
            if name not in records:
                problems.append(f"{name} is not a recording rule of the rules directory")
            elif labels and dashboard:
                problems.append(f"{name}: select recording rules without labels (live inlines them)")
            continue
        else:
            fam, problem = family_of(name, catalog)
            if problem:
                problems.append(problem)
                continue
            allowed = fam.labels | TARGET_LABELS | ({"le"} if name.endswith("_bucket") else set())
        for label in sorted(labels - allowed):
            problems.append(f"{name} has no label {label}")
    if dashboard:
        for func, window in s.ranges:
            if func in ("rate", "irate") and window not in ("$__rate_interval", "${__rate_interval}"):
                problems.append(f"{func}() window [{window}]: use $__rate_interval")
            if func == "increase" and window not in ("$__rate_interval", "${__rate_interval}", "$__range", "${__range}"):
                problems.append(f"increase() window [{window}]: use $__rate_interval or $__range")
        for v in sorted(s.variables):
            if v not in BUILTINS and (variables is None or v not in variables):
                problems.append(f"${v} is not a variable of the dashboard")
    return [f"{where}: {p}" for p in problems]


# ---- dashboards ---------------------------------------------------------------

class Item:
    """One query of a dashboard: a panel target or a variable's query."""

    def __init__(self, dashboard, title, ref, expr):
        self.dashboard = dashboard
        self.title = title
        self.ref = ref
        self.expr = expr


def walk_panels(panels):
    for p in panels or []:
        yield p
        yield from walk_panels(p.get("panels"))


def variable_query(v):
    q = v.get("query")
    if isinstance(q, dict):
        q = q.get("query", "")
    return q or v.get("definition", "")


def label_values_expr(q):
    """The series selector of `label_values(EXPR, label)`; None otherwise."""
    m = re.fullmatch(r"\s*label_values\((.*),\s*(\w+)\s*\)\s*", q or "", re.S)
    return m.group(1).strip() if m else None


def load_dashboards(d):
    files = sorted(glob.glob(os.path.join(d, "*.json")))
    out = []
    for path in files:
        with open(path, encoding="utf-8") as f:
            out.append((path, json.load(f)))
    return out


def items_of(dashboards):
    items = []
    for path, d in dashboards:
        name = d.get("uid") or os.path.basename(path)
        for v in d.get("templating", {}).get("list", []):
            if v.get("type") == "query":
                e = label_values_expr(variable_query(v))
                if e:
                    items.append(Item(name, f"variable ${v.get('name')}", "", e))
        for p in walk_panels(d.get("panels")):
            for t in p.get("targets") or []:
                if t.get("hide"):
                    continue
                e = t.get("expr")
                if isinstance(e, str) and e.strip():
                    items.append(Item(name, p.get("title", ""), t.get("refId", ""), e))
    return items


def lint(args):
    catalog = load_catalog(args.catalog)
    if not catalog:
        print(f"lint: no metric families found in {args.catalog}", file=sys.stderr)
        return 1
    records, rules = load_yaml_rules(args.rules) if os.path.isdir(args.rules) else ({}, [])
    problems = []
    try:
        dashboards = load_dashboards(args.dir)
    except (OSError, ValueError) as e:
        print(f"lint: {e}", file=sys.stderr)
        return 1
    if not dashboards:
        problems.append(f"{args.dir}: no dashboards (*.json)")
    uids = {}
    n_panels = 0
    n_exprs = 0
    for path, d in dashboards:
        f = os.path.basename(path)
        uid, title = d.get("uid"), d.get("title")
        if not uid:
            problems.append(f"{f}: no uid")
        elif uid in uids:
            problems.append(f"{f}: uid {uid} also used by {uids[uid]}")
        else:
            uids[uid] = f
        if not title:
            problems.append(f"{f}: no title")
        variables = {}
        for v in d.get("templating", {}).get("list", []):
            variables[v.get("name")] = v
        ds = variables.get("datasource")
        if not ds or ds.get("type") != "datasource" or ds.get("query") != "prometheus":
            problems.append(f"{f}: no `datasource` variable of type datasource (prometheus)")
        for name, v in variables.items():
            if v.get("type") == "query":
                q = variable_query(v)
                e = label_values_expr(q)
                if e is None:
                    problems.append(f"{f}: variable ${name}: only label_values(SERIES, label) queries are checked: {q!r}")
                else:
                    problems.extend(check_expr(e, catalog, records, f"{f}: variable ${name}", variables=variables))
                if v.get("datasource", {}).get("uid") != "${datasource}":
                    problems.append(f"{f}: variable ${name}: datasource is not ${{datasource}}")
        ids = set()
        for p in walk_panels(d.get("panels")):
            ptype = p.get("type")
            if ptype == "row":
                continue
            n_panels += 1
            ptitle = p.get("title") or ""
            where = f"{f}: panel {ptitle!r}"
            if not ptitle:
                problems.append(f"{where}: no title")
            if p.get("id") in ids:
                problems.append(f"{where}: id {p.get('id')} used twice")
            ids.add(p.get("id"))
            if ptype == "text":
                continue
            if (p.get("datasource") or {}).get("uid") != "${datasource}":
                problems.append(f"{where}: datasource is not ${{datasource}}")
            targets = p.get("targets") or []
            if not targets:
                problems.append(f"{where}: no targets")
            for t in targets:
                e = t.get("expr")
                tw = f"{where} [{t.get('refId', '?')}]"
                if not isinstance(e, str) or not e.strip():
                    problems.append(f"{tw}: no expr")
                    continue
                n_exprs += 1
                if "\n" in e:
                    problems.append(f"{tw}: expression spans lines")
                ds_t = t.get("datasource")
                if ds_t and ds_t.get("uid") != "${datasource}":
                    problems.append(f"{tw}: datasource is not ${{datasource}}")
                problems.extend(check_expr(e, catalog, records, tw, variables=variables))
    for path, name, expr in rules:
        problems.extend(check_expr(expr, catalog, records, f"{os.path.basename(path)}: {name}", dashboard=False))
    for p in problems:
        print(p)
    if problems:
        print(f"lint: {len(problems)} problem(s)")
        return 1
    print(f"lint: {len(dashboards)} dashboards, {n_panels} panels, {n_exprs} expressions, "
          f"{len(rules)} rules: every metric is in the catalog")
    return 0


# ---- turning dashboard expressions into queries --------------------------------

MATCHER_RE = re.compile(r'(=~|!~|!=|=)(\s*)"((?:[^"\\]|\\.)*)"')


def substitute(expr):
    """The query `live` sends for a dashboard expression; raises ValueError."""
    def matcher(m):
        op, ws, value = m.group(1), m.group(2), m.group(3)
        if not VAR_RE.search(value):
            return m.group(0)
        if op not in ("=~", "="):
            raise ValueError(f"cannot substitute a variable after {op}")
        return f'=~{ws}"{VAR_RE.sub(".+", value)}"'

    out = MATCHER_RE.sub(matcher, expr)

    def builtin(m):
        name = m.group(1) or m.group(2) or m.group(3)
        if name in BUILTINS:
            return BUILTINS[name]
        raise ValueError(f"variable ${name} outside a label matcher")

    out = VAR_RE.sub(builtin, out)
    return re.sub(r"\s+", " ", out).strip()


SUBQUERY_STEP = "10s"


def inline(expr, records, depth=0):
    """expr with every `claudefs:` recording rule replaced by its expression
    (a range over one becomes a subquery at SUBQUERY_STEP resolution, so a
    young Prometheus has enough points)."""
    if depth > 10:
        raise ValueError("recording rules nest too deep")
    toks = lex(expr)
    edits = []
    for i, (kind, text, start, end) in enumerate(toks):
        if kind != "ident" or not text.startswith("claudefs:"):
            continue
        if text not in records:
            raise ValueError(f"{text} is not a recording rule of the rules directory")
        body = "(" + inline(records[text], records, depth + 1) + ")"
        stop = end
        if i + 1 < len(toks) and toks[i + 1][1] == "[":
            j = i + 1
            while j < len(toks) and toks[j][1] != "]":
                j += 1
            if j < len(toks):
                window = expr[toks[i + 1][3]:toks[j][2]].strip()
                if ":" not in window:
                    window += ":" + SUBQUERY_STEP
                body += f"[{window}]"
                stop = toks[j][3]
        edits.append((start, stop, body))
    for start, stop, body in reversed(edits):
        expr = expr[:start] + body + expr[stop:]
    return expr


def query_of(item, records):
    q = substitute(item.expr)
    if records is not None:
        q = inline(q, records)
    return q


def prom_query(base, query, timeout):
    url = base.rstrip("/") + "/api/v1/query?" + urllib.parse.urlencode({"query": query})
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            body = json.load(r)
    except urllib.error.HTTPError as e:
        try:
            body = json.load(e)
        except ValueError:
            return "ERROR", f"HTTP {e.code}"
    except (urllib.error.URLError, OSError, ValueError) as e:
        return "ERROR", str(e)
    if body.get("status") != "success":
        return "ERROR", f"{body.get('errorType', '')}: {body.get('error', body)}"
    data = body.get("data", {})
    result = data.get("result")
    if data.get("resultType") in ("scalar", "string"):
        return ("ok", "") if result else ("EMPTY", "no result")
    if not result:
        return "EMPTY", "no series"
    values = []
    for r in result:
        if "value" in r:
            values.append(r["value"][1])
        elif "values" in r:
            values.extend(v[1] for v in r["values"])
    if values and all(v == "NaN" for v in values):
        return "EMPTY", f"{len(result)} series, all NaN"
    return "ok", f"{len(result)} series"


def live(args):
    records = None
    if args.rules_dir:
        records, _ = load_yaml_rules(args.rules_dir)
    allow = [re.compile(a) for a in args.allow_empty]
    items = items_of(load_dashboards(args.dir))
    if not items:
        print(f"live: no expressions in {args.dir}", file=sys.stderr)
        return 1
    failed = 0
    for it in items:
        label = f"{it.dashboard} | {it.title}" + (f" [{it.ref}]" if it.ref else "")
        try:
            q = query_of(it, records)
        except ValueError as e:
            print(f"ERROR {label}: {e}: {it.expr}")
            failed += 1
            continue
        status, detail = prom_query(args.prom_url, q, args.timeout)
        if status == "EMPTY" and any(a.search(it.title) or a.search(it.expr) for a in allow):
            print(f"ok    {label}: empty, allowed: {q}")
            continue
        if status == "ok":
            print(f"ok    {label}: {q}")
        else:
            failed += 1
            print(f"{status:<5} {label}: {detail}: {q}")
    print(f"live: {len(items) - failed} of {len(items)} expressions answered" +
          (f", {failed} failed" if failed else ""))
    return 1 if failed else 0


def exprs(args):
    records = load_yaml_rules(args.rules_dir)[0] if args.rules_dir else None
    seen = set()
    for it in items_of(load_dashboards(args.dir)):
        try:
            q = re.sub(r"\s+", " ", it.expr).strip() if args.raw else query_of(it, records)
        except ValueError as e:
            print(f"exprs: {it.dashboard} | {it.title}: {e}", file=sys.stderr)
            return 1
        if q not in seen:
            seen.add(q)
            print(q)
    return 0


def metrics(args):
    catalog = load_catalog(args.catalog)
    records = load_yaml_rules(args.rules_dir)[0] if args.rules_dir else None
    names = set()
    for it in items_of(load_dashboards(args.dir)):
        e = it.expr
        if records is not None:
            e = inline(e, records)
        for name, _, _, _ in scan(e).selectors:
            fam, _ = family_of(name, catalog)
            if fam:
                names.add(fam.name)
    for n in sorted(names):
        print(n)
    return 0


def main(argv=None):
    ap = argparse.ArgumentParser(
        description="Check the ClaudeFS Grafana dashboards (see the module docstring).",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = ap.add_subparsers(dest="mode", required=True)
    p = sub.add_parser("lint", help="static checks against docs/metrics.md and the rules")
    p.add_argument("dir")
    p.add_argument("--rules", default=DEFAULT_RULES)
    p.add_argument("--catalog", default=DEFAULT_CATALOG)
    p.set_defaults(fn=lint)
    p = sub.add_parser("live", help="run every expression against a Prometheus")
    p.add_argument("prom_url")
    p.add_argument("dir")
    p.add_argument("rules_dir", nargs="?")
    p.add_argument("--allow-empty", action="append", default=[], metavar="REGEX")
    p.add_argument("--timeout", type=float, default=10.0)
    p.set_defaults(fn=live)
    p = sub.add_parser("exprs", help="print every expression")
    p.add_argument("dir")
    p.add_argument("rules_dir", nargs="?")
    p.add_argument("--raw", action="store_true")
    p.set_defaults(fn=exprs)
    p = sub.add_parser("metrics", help="print every catalog family the dashboards read")
    p.add_argument("dir")
    p.add_argument("rules_dir", nargs="?")
    p.add_argument("--catalog", default=DEFAULT_CATALOG)
    p.set_defaults(fn=metrics)
    args = ap.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
