"""The cluster configs: the launcher YAMLs against the schema Ray ships, the KubeRay manifests against the fields
KubeRay requires, the runtime_env example, the Grafana dashboard against the metrics neoxray exports. Then a real
multi-node Ray cluster: a head and a second node started with `ray start` as separate processes on this machine
(token authentication on, as `ray start --head` has it by default in Ray 2.60), a job submitted with
`ray job submit --working-dir . -- sh -c "neoxray prepare ... && neoxray train ..."`, Ray Train workers on both
nodes, a checkpoint per step, and a second submission (through cluster/runtime_env.yaml) that resumes from them
with the losses of one uninterrupted process. The cluster is separate from the session's `ray_local` one (its own
ports, temp directories and token; its processes get their own RAY_* environment) and is torn down here."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import tempfile
import time
import urllib.error
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, SAMPLE
from tests.support.cluster import VENV_BIN, TwoNodeCluster

# the job's training run: tiny model, dp 1 x tp 1 x pp 2 (one pipeline stage per node), a checkpoint every step
STEPS, MORE = 3, 5
TRAIN = [
    "model.overrides.vocab_size=1024",
    "model.overrides.max_seq_len=64",
    "train.seq_len=32",
    "parallel.data=1",
    "parallel.tensor=1",
    "parallel.pipeline=2",
    "train.global_batch=8",
    "train.micro_batch=2",
    "schedule.warmup_steps=1",
    f"schedule.decay_steps={MORE}",
    "optimizer.lr=3e-3",
    "optimizer.min_lr=3e-4",
    "train.seed=7",
    "data.seed=11",
    "checkpoint.every=1",
    "checkpoint.keep=2",
    "eval.every=0",
    "logging.tensorboard=false",
]


CLUSTER = ROOT / "cluster"
GPUS_20B = 96  # the paper: 12 nodes x 8 A100-40GB, tensor 2 x pipeline 4 x data 12


def load_yaml(path: Path):
    return yaml.safe_load(path.read_text())


def layout_of(train_args: list[str]) -> tuple[int, int, int]:
    """(dp, tp, pp) of a `neoxray train` command line, through the real config loader and validation."""
    from neoxray.platform.train.config import load_run_config, validate

    config = train_args[train_args.index("--config") + 1]
    overrides = [a for a in train_args if "=" in a and not a.startswith("-")]
    cfg = load_run_config(str(ROOT / config), overrides)
    validate(cfg)
    return cfg.parallel.data, cfg.parallel.tensor, cfg.parallel.pipeline


# ---------------------------------------------------------------------------------------------------------
# Ray cluster launcher configs
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, instance_key, instance", [("aws", "InstanceType", "p4d.24xlarge"), ("gcp", "machineType", "a2-highgpu-8g")]
)
def test_launcher_config_validates_against_rays_schema(name, instance_key, instance):
    import jsonschema
    import ray
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = load_yaml(CLUSTER / f"{name}.yaml")
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(cfg, schema)  # the file as written
    validate_config(prepare_config(cfg))  # and as `ray up` sees it: merged with the provider's defaults
    assert cfg["provider"]["type"] == name

    # GPU workers sized for the 20B run: 12 nodes of 8 A100-40GB
    types = cfg["available_node_types"]
    gpu = [t for t in types.values() if t["resources"].get("GPU")]
    assert len(gpu) == 1 and gpu[0]["node_config"][instance_key] == instance
    assert gpu[0]["resources"]["GPU"] * gpu[0]["max_workers"] == GPUS_20B
    assert cfg["max_workers"] >= gpu[0]["max_workers"]
    assert not types[cfg["head_node_type"]]["resources"].get("GPU")
    assert layout_of(["--config", "configs/neox-20b.yaml"]) == (12, 2, 4)

    # setup installs torch, Ray (the version the tests run) and neoxray; Ray starts with token auth on every node
    setup = " ".join(cfg["setup_commands"])
    assert "torch==" in setup and f"ray[default,train,data,serve]=={ray.__version__}" in setup
    assert "neoxray @ git+" in setup
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        assert "RAY_AUTH_MODE=token ray start" in " ".join(cfg[key]), key
    assert "~/.ray/auth_token" in cfg["file_mounts"]
    # every value a user must replace is marked
    text = (CLUSTER / f"{name}.yaml").read_text()
    assert text.count("CHANGE") >= 5


# ---------------------------------------------------------------------------------------------------------
# KubeRay
# ---------------------------------------------------------------------------------------------------------
def check_ray_cluster_spec(spec: dict) -> int:
    """The fields KubeRay's RayCluster spec requires (ray-operator/apis/ray/v1/raycluster_types.go); returns the
    worker groups' GPUs at their maximum size."""
    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict)
    assert all(isinstance(v, str) for v in head["rayStartParams"].values()), "rayStartParams values are strings"
    containers = head["template"]["spec"]["containers"]
    assert containers and all(c["name"] and c["image"] for c in containers)
    assert spec["rayVersion"] == "2.60.0" and spec["authOptions"]["mode"] == "token"
    gpus = 0
    names = set()
    for group in spec["workerGroupSpecs"]:
        assert group["groupName"] and group["groupName"] not in names
        names.add(group["groupName"])
        assert isinstance(group["rayStartParams"], dict)
        assert all(isinstance(v, str) for v in group["rayStartParams"].values())
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        wcontainers = group["template"]["spec"]["containers"]
        assert wcontainers and all(c["name"] and c["image"] for c in wcontainers)
        limits = wcontainers[0]["resources"]["limits"]
        assert limits == wcontainers[0]["resources"]["requests"]
        gpus += int(limits.get("nvidia.com/gpu", 0)) * group["maxReplicas"]
        mounts = {m["name"] for m in wcontainers[0].get("volumeMounts", [])}
        assert mounts <= {v["name"] for v in group["template"]["spec"].get("volumes", [])}
    return gpus


def test_kuberay_rayjob_prepares_then_trains_on_96_gpus():
    job = load_yaml(CLUSTER / "kuberay" / "rayjob-neox-20b.yaml")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob" and job["metadata"]["name"]
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["submissionMode"] in ("K8sJobMode", "HTTPMode")
    assert check_ray_cluster_spec(spec["rayClusterSpec"]) == GPUS_20B

    from ray.runtime_env import RuntimeEnv

    RuntimeEnv(**yaml.safe_load(spec["runtimeEnvYAML"]))  # a valid runtime_env

    # the entrypoint: `neoxray prepare ...` and then `neoxray train ...`, whose layout uses every GPU
    steps = [shlex.split(part) for part in spec["entrypoint"].split("&&")]
    assert [s[:2] for s in steps] == [["neoxray", "prepare"], ["neoxray", "train"]]
    prepare, train = steps
    output = prepare[prepare.index("--output") + 1]
    assert f"data.path={output}" in train  # train reads what prepare wrote
    from neoxray.cli import build_parser

    build_parser().parse_args(prepare[1:])  # flags the CLI knows
    build_parser().parse_args(train[1:])
    dp, tp, pp = layout_of(train)
    assert dp * tp * pp == GPUS_20B


def test_kuberay_rayservice_serves_the_neoxray_app():
    svc = load_yaml(CLUSTER / "kuberay" / "rayservice-neoxray.yaml")
    assert svc["apiVersion"] == "ray.io/v1" and svc["kind"] == "RayService" and svc["metadata"]["name"]
    spec = svc["spec"]
    assert check_ray_cluster_spec(spec["rayClusterConfig"]) >= 1
    serve = yaml.safe_load(spec["serveConfigV2"])  # a YAML string, as KubeRay wants it
    (app,) = serve["applications"]
    assert app["import_path"] == "neoxray.platform.serve.app:build_app"
    from neoxray.platform.serve.app import ServeArgs

    args = ServeArgs(**app["args"])  # the builder's typed arguments accept these
    assert args.num_gpus == 1 and args.model.startswith("/mnt/neoxray/")


# ---------------------------------------------------------------------------------------------------------
# runtime_env and Grafana
# ---------------------------------------------------------------------------------------------------------
def test_runtime_env_example_is_a_valid_runtime_env():
    from ray.runtime_env import RuntimeEnv

    env = load_yaml(CLUSTER / "runtime_env.yaml")
    RuntimeEnv(**env)
    assert env["working_dir"] == "." and {".venv/", "runs/", ".git/"} <= set(env["excludes"])
    assert env["pip"]["packages"] and all(isinstance(v, str) for v in env["env_vars"].values())
    assert "RAY_AUTH_MODE" in (CLUSTER / "runtime_env.yaml").read_text()  # documented where it belongs


def test_grafana_dashboard_plots_only_metrics_neoxray_exports():
    import re

    from neoxray.platform.train.metrics import GAUGES

    dash = json.loads((CLUSTER / "grafana" / "neoxray-train.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    exprs += [v["query"]["query"] for v in dash["templating"]["list"] if v["type"] == "query"]
    used = set()
    for expr in exprs:
        metrics = re.findall(r"\bray_[A-Za-z0-9_:]+", expr)  # metric names; label names here have no ray_
        assert metrics, expr
        for name in metrics:
            # Ray exports ray.util.metrics gauges to Prometheus with a "ray_" prefix
            assert name.startswith("ray_neoxray_train_") and name[len("ray_neoxray_train_") :] in GAUGES, name
            used.add(name[len("ray_neoxray_train_") :])
    assert used == set(GAUGES), set(GAUGES) - used  # a panel for every gauge
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])


# ---------------------------------------------------------------------------------------------------------
# a two-node cluster on this machine
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def two_nodes():
    # a short root: Ray's unix sockets live under the temp dir and their paths are limited to ~107 bytes
    root = Path(tempfile.mkdtemp(prefix="nxc-", dir="/tmp"))
    cluster = TwoNodeCluster(root)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(records) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def small_pile_input(tmp_path: Path) -> Path:
    """The first 64 documents of the bundled sample, on storage every node sees (here: this machine's disk)."""
    import zstandard

    with open(SAMPLE, "rb") as f:
        docs = zstandard.ZstdDecompressor().stream_reader(f).read()
    small = tmp_path / "input" / "small.jsonl"
    small.parent.mkdir()
    small.write_bytes(b"\n".join(docs.splitlines()[:64]) + b"\n")
    return small


def job_commands(small: Path, tokenizer: Path, data: Path, run: Path) -> tuple[list[str], list[str]]:
    """The RayJob's entrypoint commands: `neoxray prepare`, then `neoxray train` (as the demo's closing hint has
    it: an override before --run-dir, the others after it; train.steps is left to the caller)."""
    prepare = ["neoxray", "prepare", "--input", str(small), "--tokenizer", str(tokenizer), "--seq-len", "32"]
    prepare += ["--output", str(data), "--workers", "1", "--quiet"]
    train = ["neoxray", "train", "--config", "configs/tiny-cpu.yaml", f"data.path={data}", "--run-dir", str(run)]
    return prepare, [*train, *TRAIN]


def start_reference(cluster: TwoNodeCluster, data: Path, ref: Path) -> subprocess.Popen:
    """The engine without Ray in one process, computing the uninterrupted run's losses (in the background)."""
    cmd = [str(VENV_BIN / "neoxray"), "train", "--no-ray", "--config", str(ROOT / "configs/tiny-cpu.yaml")]
    cmd += ["--run-dir", str(ref), f"data.path={data}", *TRAIN, "parallel.pipeline=1", f"train.steps={MORE}"]
    env = {**cluster.node_env, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [*cmd, "checkpoint.every=0"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def check_first_job(cluster: TwoNodeCluster, run: Path, nodes: set[str]) -> None:
    """Ray Train's workers ran on both nodes (the state API, through the dashboard, with the token); per-step
    metrics and a checkpoint per step (the newest 2 kept)."""
    actors = json.loads(
        cluster.ray("list", "actors", "--detail", "--format", "json", "--filter", "class_name=RayTrainWorker").stdout
    )
    assert len(actors) == 2 and {a["node_id"] for a in actors} == nodes, (actors, nodes)
    assert sorted(losses(metrics(run))) == list(range(1, STEPS + 1))
    ckpts = sorted(p.name for p in run.glob("checkpoint-step-*"))
    assert ckpts == [f"checkpoint-step-{s:07d}" for s in (STEPS - 1, STEPS)], ckpts
    meta = json.loads((run / ckpts[-1] / "meta.json").read_text())
    assert meta["layout"] == {"dp": 1, "tp": 1, "pp": 2} and meta["consumed_samples"] == 8 * STEPS


def check_resumed_like_one_process(run: Path, ref: Path) -> None:
    recs = metrics(run)
    resumed = [r for r in recs if r.get("event") == "resumed"]
    assert len(resumed) == 1 and resumed[0]["step"] == STEPS and resumed[0]["consumed_samples"] == 8 * STEPS
    got, want = losses(recs), losses(metrics(ref))
    assert sorted(got) == list(range(1, MORE + 1))
    assert (run / f"checkpoint-step-{MORE:07d}" / "meta.json").exists()
    for s in range(1, MORE + 1):
        assert abs(got[s] - want[s]) <= 1e-4 * abs(want[s]), (s, got[s], want[s])


@pytest.mark.e2e
def test_ray_job_submit_on_two_nodes_trains_and_resumes(two_nodes, sample_tokenizer_dir, tmp_path):
    cluster = two_nodes
    nodes = cluster.alive_nodes()
    assert len(nodes) == 2 and {bool(n["resources_total"].get("head_node")) for n in nodes} == {True, False}

    # token authentication is on: the job API refuses a request without the token, or with a wrong one
    for token in (None, "not-the-token"):
        with pytest.raises(urllib.error.HTTPError) as err:
            cluster.api("/api/jobs/", token=token)
        assert err.value.code in (401, 403)

    # the RayJob's entrypoint: prepare, then train; `--working-dir .` uploads the checkout (Ray leaves out what
    # .gitignore lists: .venv/, runs/, ...)
    data, run = tmp_path / "data", tmp_path / "run"
    prepare, train = job_commands(small_pile_input(tmp_path), sample_tokenizer_dir, data, run)
    entrypoint = f"{shlex.join(prepare)} && {shlex.join([*train, f'train.steps={STEPS}'])}"  # as in the RayJob
    t0 = time.time()
    first = cluster.ray("job", "submit", "--working-dir", ".", "--", "sh", "-c", entrypoint, cwd=ROOT, timeout=400)
    t1 = time.time()
    assert "succeeded" in first.stdout, first.stdout[-5000:]
    assert (data / "manifest.json").exists()
    check_first_job(cluster, run, {n["node_id"] for n in nodes})

    # the same run submitted again with more steps, with the shipped runtime_env example (its working_dir ".",
    # excludes and env_vars, less `pip`: no package index in CI; HF_HOME on this test's disk), resumes from its
    # newest checkpoint; meanwhile one process without Ray computes the uninterrupted run
    reference = start_reference(cluster, data, tmp_path / "ref")
    try:
        env = yaml.safe_load((ROOT / "cluster/runtime_env.yaml").read_text())
        env.pop("pip")
        env["env_vars"]["HF_HOME"] = str(tmp_path / "hf")
        more = [*train, f"train.steps={MORE}"]
        cluster.ray("job", "submit", "--runtime-env-json", json.dumps(env), "--", *more, cwd=ROOT, timeout=300)
        t2 = time.time()
        out, _ = reference.communicate(timeout=300)
    finally:
        reference.kill()
    assert reference.returncode == 0, out[-5000:]
    check_resumed_like_one_process(run, tmp_path / "ref")
    print(f"\nfirst job {t1 - t0:.0f} s, resumed job {t2 - t1:.0f} s, reference after it {time.time() - t2:.0f} s")
