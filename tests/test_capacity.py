"""The capacity model: every stage's request checked against the cluster before anything starts."""

import logging

import pytest

from lesion.config import Config, apply_overrides
from pipelines import capacity
from pipelines.capacity import CapacityError, Cluster, Need

LAPTOP = Cluster(cpu=2.0, memory=8 * 2**30)


def test_a_request_that_fits_passes():
    config = Config()
    capacity.check("train", capacity.train_needs("scratch_cnn", config.model_config("scratch_cnn")), LAPTOP)


def test_a_gpu_request_without_gpus_names_resource_amounts_and_setting():
    cfg = apply_overrides(Config(), {"train.gpus_per_worker": 1.0}).model_config("resnet50")
    with pytest.raises(CapacityError) as err:
        capacity.check("train resnet50", capacity.train_needs("resnet50", cfg), LAPTOP)
    text = str(err.value)
    assert "GPU: needs 2" in text and "the cluster has 0" in text
    assert "train.gpus_per_worker" in text


def test_training_leaves_a_cpu_for_ray_data():
    # 2 workers x 1 CPU on 2 CPUs leave nothing for the lazy read: the hang of RAY-NOTES.md, refused up front.
    cfg = apply_overrides(Config(), {"train.cpus_per_worker": 1.0}).model_config("scratch_cnn")
    with pytest.raises(CapacityError, match=r"CPU: needs 3 .*Ray Data reading 1 x 1.*the cluster has 2"):
        capacity.check("train", capacity.train_needs("scratch_cnn", cfg), LAPTOP)


def test_an_actor_larger_than_every_node_is_refused_even_if_the_total_fits():
    cluster = Cluster(cpu=8.0, nodes=2, node_cpu=4.0)
    with pytest.raises(CapacityError, match="one actor of big needs 6, the largest node has 4"):
        capacity.check("x", [Need("big", 1, 6.0, setting="x.cpus")], cluster)


def test_autoscaling_cluster_warns_instead_of_failing(caplog):
    cluster = Cluster(cpu=2.0, autoscaling=True)
    with caplog.at_level(logging.WARNING):
        capacity.check("tune", [Need("tune trials", 8, 1.0, 1.0, setting="tune.gpus_per_trial")], cluster)
    assert "waiting for the autoscaler" in caplog.text and "GPU: needs 8" in caplog.text


def test_memory_is_checked_when_known():
    with pytest.raises(CapacityError, match=r"memory: needs 16.0 GiB"):
        capacity.check("x", [Need("actors", 2, 0.1, memory=8 * 2**30, setting="m")], Cluster(cpu=2, memory=2**30))


def test_serving_four_models_on_two_cpus_shrinks_each_replica_and_says_so():
    config = Config()  # cpus_per_replica 0.5: 4 models + Grad-CAM + ingress = 6 replicas = 3 CPU
    share, note = capacity.serve_replica_cpus(config, 4, LAPTOP)
    assert share == pytest.approx(0.33)
    assert "6 replicas x 0.5 CPU need 3 CPU" in note and "serve.cpus_per_replica" in note
    capacity.check("serve", capacity.serve_needs(config, 4, share), LAPTOP)  # now it fits


def test_serving_keeps_its_share_where_it_fits_or_nodes_may_come():
    config = Config()
    assert capacity.serve_replica_cpus(config, 1, Cluster(cpu=4.0)) == (0.5, None)
    assert capacity.serve_replica_cpus(config, 4, Cluster(cpu=2.0, autoscaling=True)) == (0.5, None)


def test_serving_on_a_gpu_share_without_gpus_fails_before_starting():
    config = apply_overrides(Config(), {"serve.gpus_per_replica": 1.0})
    share, _ = capacity.serve_replica_cpus(config, 2, LAPTOP)
    with pytest.raises(CapacityError, match=r"GPU: needs 3 .*the cluster has 0.*serve.gpus_per_replica"):
        capacity.check("serve", capacity.serve_needs(config, 2, share), LAPTOP)


def test_tune_concurrency_follows_the_cluster():
    config = apply_overrides(Config(), {"tune.trials": 8, "tune.cpus_per_trial": 1.0})
    assert capacity.tune_concurrency(config, LAPTOP) == 2
    gpu = apply_overrides(config, {"tune.gpus_per_trial": 0.25, "tune.cpus_per_trial": 0.5})
    assert capacity.tune_concurrency(gpu, Cluster(cpu=16, gpu=1)) == 4
    assert capacity.tune_concurrency(apply_overrides(config, {"tune.max_concurrent": 3}), LAPTOP) == 3


def test_simulated_cluster_from_json():
    cluster = Cluster.parse('{"GPU": 8, "CPU": 64, "nodes": 2}')
    assert (cluster.cpu, cluster.gpu, cluster.node_gpu) == (64, 8, 4)
    with pytest.raises(ValueError, match="not JSON"):
        Cluster.parse("{GPU: 8")


def test_disk_check_names_the_need_and_the_free_space(tmp_path):
    capacity.check_disk(tmp_path, 1024, "ingest")
    with pytest.raises(CapacityError, match=r"ingest: needs about .* GiB of disk under .* GiB is free; lower data"):
        capacity.check_disk(tmp_path / "not" / "yet", 1e18, "ingest", "data.image_size")


def test_waiting_notice_names_what_ray_cannot_schedule(ray_local, caplog):
    import ray

    @ray.remote(num_gpus=1)
    def needs_a_gpu():
        return 1

    ref = needs_a_gpu.remote()
    with caplog.at_level(logging.WARNING, logger="pipelines.capacity"):
        with capacity.waiting_notice("demo", after_s=2, every_s=2):
            ray.wait([ref], timeout=5)
    ray.cancel(ref, force=True)
    assert "demo: waiting for resources" in caplog.text and "GPU" in caplog.text


def test_ingest_refuses_a_disk_too_small_before_starting_ray(tmp_path, monkeypatch):
    import collections

    from conftest import tiny_config
    from lesion.rundir import RunDir
    from pipelines.ingest import ingest

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(capacity.shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 1000, 1000))
    monkeypatch.setattr("pipelines.ingest.init_ray", lambda **kwargs: pytest.fail("Ray started"))
    with pytest.raises(CapacityError, match=r"ingest of 280 images at 32 px: needs about .* GiB of disk under .*"
                                            r"0.00 GiB is free; lower data.image_size"):
        ingest(tiny_config(), RunDir(tmp_path / "run"))
