"""Prometheus (Debian's package) discovers tessera-registered instances through its
`consul_sd_configs`, exactly as it would from Consul."""

import json
import os
import shutil
import subprocess
import tempfile
import urllib.request

import consul
import pytest

from conftest import free_port, wait_until


def prometheus_binary():
    """A Prometheus build with Consul service discovery, or a skip that says why not.

    Debian's prometheus (2.42+ds) is built without `consul_sd_configs`; set
    PROMETHEUS_BIN to an upstream build to run this test."""
    prom = os.environ.get("PROMETHEUS_BIN") or shutil.which("prometheus")
    if prom is None:
        if os.environ.get("CI") == "true":
            pytest.fail("prometheus is not installed (apt-get install prometheus); .ci/run installs it")
        pytest.skip("prometheus not installed; run .ci/run or apt-get install prometheus")
    work = tempfile.mkdtemp(prefix="prom-probe-")
    try:
        cfg = os.path.join(work, "probe.yml")
        with open(cfg, "w") as f:
            f.write("scrape_configs:\n  - job_name: p\n    consul_sd_configs:\n      - server: '127.0.0.1:1'\n")
        promtool = os.path.join(os.path.dirname(prom), "promtool")
        if os.path.exists(promtool):
            out = subprocess.run([promtool, "check", "config", cfg], capture_output=True, text=True)
            if "consul_sd_configs not found" in out.stdout + out.stderr:
                pytest.skip(f"{prom} is built without Consul service discovery (Debian strips it); "
                            "set PROMETHEUS_BIN to an upstream Prometheus build")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return prom


def test_prometheus_consul_sd_discovers_instances(tessera):
    prom = prometheus_binary()
    host, port = tessera
    c = consul.Consul(host=host, port=port)
    c.agent.service.register("web", service_id="web1", address="127.0.0.1", port=18081, tags=["metrics"],
                             meta={"team": "shop"})
    c.agent.service.register("web", service_id="web2", address="127.0.0.1", port=18082, tags=["metrics"])
    c.agent.service.register("hidden", service_id="h1", address="127.0.0.1", port=18083)

    work = tempfile.mkdtemp(prefix="prom-")
    cfg = os.path.join(work, "prometheus.yml")
    with open(cfg, "w") as f:
        f.write(f"""
global:
  scrape_interval: 1h
scrape_configs:
  - job_name: tessera
    consul_sd_configs:
      - server: "{host}:{port}"
        services: ["web"]
""")
    web_port = free_port()
    proc = subprocess.Popen(
        [prom, f"--config.file={cfg}", f"--storage.tsdb.path={work}/data",
         f"--web.listen-address=127.0.0.1:{web_port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        def targets():
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{web_port}/api/v1/targets", timeout=5) as r:
                    data = json.load(r)
            except OSError:
                return None
            active = data["data"]["activeTargets"]
            found = sorted(t["discoveredLabels"]["__address__"] for t in active)
            return active if found == ["127.0.0.1:18081", "127.0.0.1:18082"] else None

        active = wait_until("prometheus discovers both web instances", targets, timeout=90, interval=0.5)
        labels = {t["discoveredLabels"]["__address__"]: t["discoveredLabels"] for t in active}
        web1 = labels["127.0.0.1:18081"]
        assert web1["__meta_consul_service"] == "web"
        assert web1["__meta_consul_service_id"] == "web1"
        assert web1["__meta_consul_node"] == "peer-node"
        assert web1["__meta_consul_dc"] == "dc1"
        assert web1["__meta_consul_service_metadata_team"] == "shop"
        assert ",metrics," in web1["__meta_consul_tags"]

        # A deregistration reaches Prometheus through its blocking query.
        c.agent.service.deregister("web2")

        def one_left():
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{web_port}/api/v1/targets", timeout=5) as r:
                    data = json.load(r)
            except OSError:
                return False
            return [t["discoveredLabels"]["__address__"] for t in data["data"]["activeTargets"]] == ["127.0.0.1:18081"]

        wait_until("prometheus drops the deregistered instance", one_left, timeout=90, interval=0.5)
    finally:
        proc.kill()
        proc.wait()
        shutil.rmtree(work, ignore_errors=True)
