"""The Serve config and typed app builder, and the API's failure modes on one in-process server (uvicorn, no
Ray): a full queue, a dead engine, graceful shutdown."""

from __future__ import annotations

import threading
import time
import types

import pytest
import requests
import yaml

from neoxray.errors import NeoxrayError
from neoxray.model.decoding import SamplingParams
from neoxray.model.hf import load_model_and_tokenizer
from neoxray.platform.serve.engine import InferenceEngine
from neoxray.platform.serve.request import EngineConfig, Request
from tests.conftest import ROOT, free_port, run_cli


def test_shipped_serve_config_validates_and_builds(tiny_model_dir):
    from pydantic import ValidationError
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve.deployment import Application
    from ray.serve.schema import ServeDeploySchema

    from neoxray.platform.serve.app import ServeArgs, build_app

    raw = yaml.safe_load((ROOT / "configs" / "serve.yaml").read_text())
    schema = (
        ServeDeploySchema.model_validate(raw)
        if hasattr(ServeDeploySchema, "model_validate")
        else ServeDeploySchema.parse_obj(raw)
    )
    app_cfg = schema.applications[0]
    assert app_cfg.import_path == "neoxray.platform.serve.app:build_app"
    ServeArgs(**app_cfg.args)  # every key the shipped config sets is a known, valid argument
    args = {**app_cfg.args, "model": str(tiny_model_dir)}
    app = call_user_app_builder_with_args_if_necessary(build_app, args)  # what `serve run/deploy` does
    assert isinstance(app, Application)
    with pytest.raises(ValidationError, match="max_num_seq"):
        call_user_app_builder_with_args_if_necessary(build_app, {**args, "max_num_seq": 4})
    with pytest.raises(NeoxrayError, match="no/such/model"):
        build_app({"model": "no/such/model"})


def test_serve_cli_refuses_a_missing_model_before_starting_anything():
    proc = run_cli("serve", "--model", "no/such/model", check=False, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == ["neoxray: error: model not found: no/such/model"]
    proc = run_cli("serve", "--model", "no/such/model", "--replicas", "0", check=False, timeout=120)
    assert proc.returncode == 1 and "num_replicas" in proc.stderr


# ------------------------------------------------------------------------------------------------ in-process
class Server:
    def __init__(self, engine, **kw):
        import uvicorn

        from neoxray.platform.serve.api import create_app

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(
            uvicorn.Config(create_app(engine, **kw), host="127.0.0.1", port=self.port, log_level="warning")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.05)

    def close(self):
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture()
def model_tok(tiny_model_dir):
    return load_model_and_tokenizer(tiny_model_dir)


def test_a_full_queue_gets_503_and_the_server_recovers(model_tok):
    engine = InferenceEngine(*model_tok, EngineConfig(max_num_seqs=1, max_waiting=1)).start()
    gate = threading.Event()
    engine.call(gate.wait)  # hold the engine thread so that requests pile up
    srv = Server(engine)
    try:
        codes = []

        def one():
            codes.append(
                requests.post(
                    srv.url + "/v1/completions", json={"prompt": "x", "max_tokens": 4}, timeout=60
                ).status_code
            )

        threads = [threading.Thread(target=one) for _ in range(4)]
        for t in threads:
            t.start()
        time.sleep(1.5)
        gate.set()
        for t in threads:
            t.join(60)
        assert sorted(codes)[0] == 200 and 503 in codes, codes
        r = requests.post(srv.url + "/v1/completions", json={"prompt": "x", "max_tokens": 4}, timeout=60)
        assert r.status_code == 200
    finally:
        gate.set()
        srv.close()
        engine.stop(timeout=10)


def test_a_dead_engine_fails_health_and_requests_with_503(model_tok):
    from neoxray.platform.serve.app import NeoxrayServer

    engine = InferenceEngine(*model_tok).start()
    srv = Server(engine)
    try:
        assert requests.get(srv.url + "/health").status_code == 200
        NeoxrayServer.func_or_class.check_health(types.SimpleNamespace(engine=engine))  # healthy: no error

        def broken(*a, **k):
            raise RuntimeError("simulated device failure")

        engine._decode = broken
        r = requests.post(srv.url + "/v1/completions", json={"prompt": "x", "max_tokens": 4}, timeout=60)
        assert r.status_code == 503 and "simulated device failure" in r.json()["error"]["message"]
        assert requests.get(srv.url + "/health").status_code == 503
        with pytest.raises(RuntimeError, match="simulated device failure"):
            NeoxrayServer.func_or_class.check_health(types.SimpleNamespace(engine=engine))
        r = requests.post(srv.url + "/v1/completions", json={"prompt": "x", "max_tokens": 4}, timeout=60)
        assert r.status_code == 503
    finally:
        srv.close()


def test_graceful_stop_finishes_running_requests(model_tok):
    engine = InferenceEngine(*model_tok).start()
    results = []
    reqs = [
        Request([3, 4, 5], max_tokens=40, sampling=SamplingParams(greedy=True, stop_at_eod=False)) for _ in range(4)
    ]
    for r in reqs:
        engine.add_request(r, lambda o: o.finish_reason and results.append(o.finish_reason))
    engine.stop(timeout=30, drain=True)
    assert results == ["length"] * 4
    with pytest.raises(NeoxrayError, match="stopped"):
        engine.add_request(reqs[0], lambda o: None)


def test_grafana_serving_dashboard_plots_every_serve_metric():
    import json
    import re

    from neoxray.platform.serve.metrics import METRICS

    dash = json.loads((ROOT / "cluster" / "grafana" / "neoxray-serve.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    exprs += [v["query"]["query"] for v in dash["templating"]["list"] if v["type"] == "query"]
    used = set()
    for expr in exprs:
        for name in re.findall(r"\bray_[A-Za-z0-9_:]+", expr):
            base = re.sub(r"_(bucket|total)$", "", name[len("ray_") :])  # Prometheus suffixes of histograms, counters
            assert base in METRICS, name
            used.add(base)
    assert used == set(METRICS), set(METRICS) - used
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])
