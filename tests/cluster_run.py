"""Run sweeps on a real multi-node Ray cluster on this machine (ray.cluster_utils.Cluster), in its
own process because the test session already holds a local Ray. Prints one JSON line.

    python tests/cluster_run.py WORKDIR
"""
import json
import os
import sys
from pathlib import Path

import yaml


def sweep_file(workdir: Path, name: str, model: str, resources: dict, **train) -> str:
    doc = {"name": name, "metric": "val_acc", "mode": "max", "model": {"name": model, "width": 0.5},
           "data": {"source": "synthetic", "synthetic_size": 3000, "val_size": 500},
           "train": {"epochs": 3, "batch_size": 64, "lr": {"grid": [0.01, 0.02, 0.03, 0.04]}, **train},
           "resources": resources, "wandb": {"mode": "disabled"}}
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return str(path)


def main() -> None:
    workdir = Path(sys.argv[1])
    import ray
    from ray.cluster_utils import Cluster

    from cifar_ray.ray_process import WORKER_NICENESS
    from cifar_ray.sweep import main as sweep

    os.environ.setdefault(WORKER_NICENESS, "0")  # trials at this process's priority, as a sweep's own Ray
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    gpu_node = cluster.add_node(num_cpus=4, num_gpus=1, resources={"cuda": 1})
    cluster.add_node(num_cpus=2, resources={"mps": 1})
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    results = str(workdir / "results")
    out = {"gpu_node_id": gpu_node.node_id}
    out["cuda_rc"] = sweep([sweep_file(workdir, "on_cuda", "netconv", {"cpu": 1, "gpu": 0.25, "tags": {"cuda": 0.25}}),
                            "--storage-path", results])
    out["mps_rc"] = sweep([sweep_file(workdir, "on_mps", "netconv", {"cpu": 1, "tags": {"mps": 1}}, epochs=1),
                           "--storage-path", results])
    out["inception_mps_rc"] = sweep([sweep_file(workdir, "inception_mps", "inception", {"cpu": 1, "tags": {"mps": 1}}),
                                     "--storage-path", results])
    out["nobody_rc"] = sweep([sweep_file(workdir, "nobody", "netconv", {"cpu": 1, "tags": {"tpu": 1}}),
                              "--storage-path", results])
    out["nodes"] = {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}
    ray.shutdown()
    cluster.shutdown()
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    main()
