"""End to end on a real multi-node Ray cluster started on this machine (``ray.cluster_utils.Cluster``).

Three raylets: a head with 0 CPUs (it runs the GCS and the Serve proxy, never work) and two worker
nodes with 1 CPU each. One cluster serves the whole module:

- ``jobs.train`` with 2 workers of 1 CPU: they can only run on different nodes, and ``workers.json``
  (each rank's node id, recorded by the rank itself) says they did. Output and Ray storage are
  ``file://`` URIs, so every file goes through ``pyarrow.fs`` as it would to ``s3://`` on a cluster
  without a shared volume;
- a Serve replica of 1 CPU (it cannot sit on the head) that downloads the run's ``runs:/``
  checkpoint from MLflow on its node, sampled over HTTP through the head's proxy;
- a smoke sweep whose trial has 2 workers (on the two nodes; its 0.01-CPU Tune driver shares a
  node with one of them) and whose Tune and Train storage and outputs live in a
  ``pyarrow.fs.SubTreeFileSystem``.
"""

from __future__ import annotations

import json
import os
import socket
import time

import numpy as np
import pytest

from jobs import train as train_job
from service import checkpoint

pytestmark = pytest.mark.e2e

TRAIN_ARGS = ["--preset", "8gaussians/mog-ip-lc", "--smoke", "--workers", "2", "--run-name", "multinode"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster():
    """Head (0 CPUs) + two 1-CPU worker nodes; yields ``(head node id, worker node ids)``.

    The head runs a dashboard, as ``ray start --head`` does: Ray Train's PlacementGroupCleaner asks the
    state API behind it whether a run's controller lives (without one the cluster's KV store names
    127.0.0.1:8265, whichever instance's dashboard listens there)."""
    import ray
    from ray.cluster_utils import Cluster

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if ray.is_initialized():  # the local instance an earlier module shared (conftest.ray_local)
        ray.shutdown()
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    try:
        workers = [c.add_node(num_cpus=1) for _ in range(2)]
        c.wait_for_nodes(timeout=300)
        ray.init(address=c.address, log_to_driver=False)
    except BaseException:
        c.shutdown()  # no raylets left behind by a half-started cluster
        raise
    yield c.head_node.node_id, {w.node_id for w in workers}
    ray.shutdown()
    c.shutdown()


@pytest.fixture(scope="module")
def trained(cluster, tmp_path_factory):
    """One ``jobs.train`` run (2 workers) with file:// URIs for output and storage: (root, args)."""
    root = tmp_path_factory.mktemp("multinode")
    args = [*TRAIN_ARGS, "--output-dir", (root / "out").as_uri(), "--storage-path", (root / "ray").as_uri(),
            "--tracking-uri", f"sqlite:///{root / 'mlflow.db'}"]
    start = time.perf_counter()
    assert train_job.main(args) == 0
    print(f"multi-node training: {time.perf_counter() - start:.1f} s")
    return root, args


def test_two_workers_train_on_two_different_worker_nodes(cluster, trained):
    head, worker_nodes = cluster
    root, _ = trained
    placement = json.loads((root / "out" / "workers.json").read_text())
    assert [w["rank"] for w in placement] == [0, 1]
    nodes = [w["node_id"] for w in placement]
    assert len(set(nodes)) == 2 and set(nodes) == worker_nodes and head not in nodes
    metrics = json.loads((root / "out" / "metrics.json").read_text())
    assert all(np.isfinite(metrics[k]) for k in ("gnelbo_x1e7", "hist_kl", "hist_jsd"))
    print("multi-node final metrics:", json.dumps(metrics))


def test_outputs_and_checkpoints_reach_the_uri_locations(trained):
    root, _ = trained
    for name in ("checkpoint.pt", "metrics.json", "config.yaml", "workers.json", "samples.png", "density.png"):
        assert (root / "out" / name).stat().st_size > 0, name  # plots and files written on a worker node
    assert checkpoint.load(root / "out" / "checkpoint.pt")["iteration"] == 12
    run_dir = root / "ray" / "multinode"
    assert (run_dir / "introprior-config.yaml").is_file()
    assert len(list(run_dir.glob("checkpoint_*/checkpoint.pt"))) == 2  # CheckpointConfig(num_to_keep=2)


def test_a_changed_config_is_refused_reading_the_record_through_the_uri(trained, capsys):
    root, args = trained
    assert train_job.main(args + ["--set", "objective.beta_kl=0.5"]) == 2
    assert "  objective.beta_kl: 0.3 -> 0.5\n" in capsys.readouterr().err


def test_serve_replica_on_a_worker_node_loads_the_runs_checkpoint(cluster, trained):
    import httpx
    import ray
    from mlflow.tracking import MlflowClient
    from ray import serve

    from jobs.load_test import wait_healthy
    from service.serving import build_app, file_sha256

    head, worker_nodes = cluster
    root, _ = trained
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("introprior").experiment_id],
                                filter_string="tags.`mlflow.runName` = 'multinode'")
    spec = f"runs:/{run.info.run_id}/checkpoint/checkpoint.pt"
    port = free_port()
    # one proxy, on the head: on one machine a proxy per node would contend for the same port
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_app({"checkpoint": spec, "tracking_uri": uri, "num_cpus": 1}), name="introprior",
                  route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, timeout_s=300)
        (name,) = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                   if a["name"].startswith("SERVE_REPLICA::introprior")]
        replica = ray.get_actor(name, namespace="serve")
        where = ray.get(replica.__ray_call__.remote(lambda _self: ray.get_runtime_context().get_node_id()))
        assert where in worker_nodes and where != head
        with httpx.Client(base_url=url, timeout=60.0) as http:
            info = http.get("/v1/model").json()
            assert info["checkpoint"]["source"] == spec and info["checkpoint"]["iteration"] == 12
            assert info["checkpoint"]["sha256"] == file_sha256(root / "out" / "checkpoint.pt")  # the run's own
            body = http.post("/v1/samples", json={"n": 16, "seed": 7}).json()
            assert np.isfinite(np.asarray(body["samples"])).all() and np.asarray(body["samples"]).shape == (16, 2)
    finally:
        serve.shutdown()


SPACE = """\
presets:
  8gaussians/sintro: {}
seeds: [0]
metric: hist_kl
mode: min
smoke: true
param_space:
  scaling: {workers: 2}
  eval: {plots: false}
"""


def test_smoke_sweep_trial_spans_both_nodes_with_storage_in_a_pyarrow_filesystem(cluster, tmp_path):
    import pyarrow.fs

    from service.spaces import load_space
    from service.tuning import run_sweep

    (tmp_path / "space.yaml").write_text(SPACE)
    (tmp_path / "store").mkdir()
    fs = pyarrow.fs.SubTreeFileSystem(str(tmp_path / "store"), pyarrow.fs.LocalFileSystem())
    start = time.perf_counter()
    head, worker_nodes = cluster
    df = run_sweep(load_space(str(tmp_path / "space.yaml")), output_dir=tmp_path / "out",
                   tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", name="multinode",
                   storage_path="sweep", storage_filesystem=fs)
    print(f"multi-node smoke sweep: {time.perf_counter() - start:.1f} s")
    assert list(df["status"]) == ["ok"], df[["status", "error"]].to_dict("records")
    assert (tmp_path / "out" / "results.parquet").is_file()  # the sweep's own files: on the driver
    for row in df.to_dict("records"):
        trial = tmp_path / "store" / "sweep" / "trials" / row["run_name"]
        assert json.loads((trial / "metrics.json").read_text())["hist_kl"] == pytest.approx(row["hist_kl"])
        assert (trial / "checkpoint.pt").is_file()
        placement = json.loads((trial / "workers.json").read_text())
        assert {w["node_id"] for w in placement} == worker_nodes  # one worker on each node
        assert list((tmp_path / "store" / "sweep" / "ray_train" / row["run_name"]).glob("checkpoint_*"))
    assert list((tmp_path / "store" / "sweep" / "tune").iterdir())  # Tune's experiment state
    assert not (tmp_path / "out" / "trials").exists() and not (tmp_path / "out" / "tune").exists()
