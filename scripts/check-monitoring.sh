#!/usr/bin/env bash
# Checks monitoring/: the Prometheus rules (syntax and unit tests), the
# example Prometheus and Alertmanager configurations, and the Grafana
# dashboards against the metric catalog (docs/metrics.md).
# Needs promtool (Debian package prometheus; amtool from
# prometheus-alertmanager is used when present) and python3.
set -euo pipefail
cd "$(dirname "$0")/.."
M=monitoring
if ! command -v promtool >/dev/null 2>&1; then
  echo "check-monitoring: promtool not found (apt-get install prometheus, or scripts/setup.sh)" >&2
  exit 1
fi
step() { echo "== $*"; }

step "promtool check rules"
promtool check rules "$M"/prometheus/rules/*.yml

step "promtool test rules"
promtool test rules "$M"/prometheus/tests/*.yml

# rule_files in prometheus.yml are relative to the file itself.
step "promtool check config"
promtool check config "$M/prometheus/prometheus.yml"

if command -v amtool >/dev/null 2>&1; then
  AM="$M/alertmanager/alertmanager.yml"
  step "amtool check-config"
  amtool check-config "$AM"
  step "amtool config routes test"
  route() { # expected receiver, then alert labels
    local want=$1; shift
    amtool config routes test --config.file="$AM" --verify.receivers="$want" "$@" 2>/dev/null >/dev/null ||
      { echo "check-monitoring: alert {$*} is not routed to $want" >&2; exit 1; }
    echo "$* -> $want"
  }
  route claudefs-pager alertname=ClaudefsNodeDown severity=critical instance=node1:7501
  route claudefs-team alertname=ClaudefsFsyncLatencyHigh severity=warning instance=node1:7501
  route claudefs-team alertname=Unlabelled
else
  echo "== amtool not found: Alertmanager configuration not checked"
fi

step "dashboards"
python3 "$M/check_dashboards.py" lint "$M/grafana/dashboards"
echo "check-monitoring: all checks passed"
