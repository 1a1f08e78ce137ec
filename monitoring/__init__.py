"""What an operator looks at: the Grafana dashboard, the Prometheus alert rules, and their checks.

* :mod:`monitoring.dashboard` generates ``monitoring/grafana/eagle3-appliance.json`` with
  Grafana's own Python SDK (``grafana-foundation-sdk``); the JSON is committed for import.
* ``monitoring/prometheus/alerts.yml`` holds the alert rules (tested by ``promtool test rules
  monitoring/prometheus/alerts_test.yml``).
* :mod:`monitoring.expressions` reads every panel query and alert expression back from those
  files and names the metrics each uses; :mod:`monitoring.check` runs them against a real
  Prometheus (``.ci/prometheus.sh``).
"""
