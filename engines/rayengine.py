"""The `ray` engine: HUDD's per-image work as Ray Data pipelines (`--engine ray`).

The images are cut into the same batches as the local engine's (`--batch-size` consecutive
images), one Ray Data row per batch, one block per row, so that any actor can take any batch.
Each actor (`--workers` of them, one CPU or one GPU each) holds one copy of the model and, for the
assign step, one copy of the cluster members' heatmaps; it reads its batch's images itself and
returns only their outputs: logits, keypoints, or distances to the clusters. The driver puts them
back in image order, so the results are the local engine's.

A worker that dies is restarted by Ray and its batch retried (Ray Data's actor pools restart
actors and retry their tasks by default), so a lost worker costs time, not results. The environment variable HUDD_RAY_KILL_ONCE=<file> (for the
tests) makes the first worker that finds <file> missing create it and die mid-batch.
"""
import math
import os
import socket
from pathlib import Path

import numpy as np

from common.errors import HUDDError
from common.inference import decode_keypoints, stack_filled

ROOT = Path(__file__).resolve().parents[1]
KILL_ONCE = "HUDD_RAY_KILL_ONCE"
UPLOAD_EXCLUDES = [".venv", ".git", "cases", "demo", "*.pth", "*.npy", "*.png", "*.gif", "*.xlsx", "__pycache__"]
CONNECT_TIMEOUT = 5.0


def _reachable(address):
    """A quick TCP check of host:port, so that a wrong address fails in seconds with one clear line."""
    target = address.removeprefix("ray://")
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise HUDDError(f"--ray-address {address}: expected auto, HOST:PORT or ray://HOST:PORT")
    try:
        with socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT):
            return
    except OSError as exc:
        raise HUDDError(f"--ray-address {address}: cannot connect ({exc.strerror or exc}); start the cluster "
                        f"there (ray start --head) or leave --ray-address out to start Ray on this machine") from None


class _Job:
    """What every actor needs, pickled once per actor."""

    def __init__(self, kind, model, dataset, batch_size, device, layer=None, rule="hudd", start=None,
                 members=None, labels=None, cluster_ids=None):
        import copy

        self.kind, self.dataset, self.batch_size, self.device = kind, dataset, int(batch_size), device
        self.model = copy.deepcopy(model).cpu()
        self.layer, self.rule, self.start = layer, rule, start
        self.members, self.labels, self.cluster_ids = members, labels, cluster_ids

    def indices(self, batch):
        return range(batch * self.batch_size, min(len(self.dataset), (batch + 1) * self.batch_size))


class _Worker:
    """One Ray Data actor: the model on its device, then batch ids in, per-image outputs out."""

    def __init__(self, job):
        import torch

        self.job = job
        self.device = torch.device(job.device if job.device != "cuda" or torch.cuda.is_available() else "cpu")
        self.model = job.model.to(self.device).eval()
        self.linkage = None
        if job.kind == "distances":
            from assignModule import SingleLinkage

            self.linkage = SingleLinkage(job.members, job.labels, job.cluster_ids)

    def __call__(self, batch):
        marker = os.environ.get(KILL_ONCE)
        if marker and not os.path.exists(marker):
            Path(marker).write_text(f"killed worker {os.getpid()}\n")
            os._exit(1)
        parts = [self._one(int(b)) for b in batch["batch"]]
        return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}

    def _one(self, batch):
        import torch

        job = self.job
        items = [job.dataset[i] for i in job.indices(batch)]
        inputs = torch.stack([item[0] for item in items])
        index = np.array([item[2] for item in items], dtype=np.int64)
        errors = np.array([item[3] for item in items], dtype=object)
        if job.kind == "distances":
            from heatmapModule import layer_relevance

            keep = np.flatnonzero(errors == "")
            if not len(keep):
                return {"index": index[:0], "value": np.zeros((0, len(job.cluster_ids)))}
            relevance = layer_relevance(self.model, inputs[keep].to(self.device), rule=job.rule, start=job.start,
                                        layers=[job.layer])[job.layer]
            if torch.is_tensor(relevance):
                relevance = relevance.detach().float().cpu().numpy()
            heatmaps = np.asarray(relevance, dtype=np.float32).reshape(len(keep), -1)
            return {"index": index[keep], "value": self.linkage(heatmaps)}
        with torch.no_grad():
            outputs = self.model(inputs.to(self.device)).float().cpu()
        if job.kind == "logits":
            value = outputs.numpy().astype(np.float32)
            return {"index": index, "value": value, "error": errors.astype(str)}
        coords = np.asarray(decode_keypoints(outputs), dtype=np.float32)
        peaks = outputs.flatten(2).amax(2).numpy()
        return {"index": index, "value": coords.reshape(len(index), -1), "peaks": peaks, "error": errors.astype(str)}


class RayEngine:
    """Ray Data over a local Ray started here (address None) or an existing cluster (auto, HOST:PORT, ray://...)."""

    name = "ray"

    def __init__(self, address=None, workers=0):
        try:
            import ray
        except ImportError:
            raise HUDDError("--engine ray: Ray is not installed in this environment; pip install -r "
                            "requirements.txt (it pins ray[data])") from None
        self.ray = ray
        self.started = False
        env = {"PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
        if os.environ.get(KILL_ONCE):
            env[KILL_ONCE] = os.environ[KILL_ONCE]
        if not ray.is_initialized():
            options = dict(include_dashboard=False, log_to_driver=False, logging_level="ERROR")
            if address in (None, "", "local"):
                ray.init(num_cpus=max(os.cpu_count() or 1, int(workers or 0)), runtime_env={"env_vars": env}, **options)
            else:
                if address != "auto":
                    _reachable(address)
                try:
                    ray.init(address=address, runtime_env={"working_dir": str(ROOT), "excludes": UPLOAD_EXCLUDES,
                                                           "env_vars": {k: v for k, v in env.items()
                                                                        if k != "PYTHONPATH"}}, **options)
                except (ConnectionError, RuntimeError, ValueError) as exc:
                    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                    raise HUDDError(f"--ray-address {address}: {first}; start the cluster (ray start --head) or "
                                    f"leave --ray-address out to start Ray on this machine") from None
            self.started = True
        import logging

        import ray.data

        logging.getLogger("ray.data").setLevel(logging.ERROR)     # a line per pipeline is noise in a HUDD run
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False
        resources = ray.cluster_resources()
        self.gpus = int(resources.get("GPU", 0))
        slots = max(1, self.gpus or int(resources.get("CPU", 1)))
        self.workers = int(workers) if workers and workers > 0 else slots
        if self.workers > slots:        # more actors than the cluster can place would wait forever
            print(f"[ray] --workers {self.workers}: the cluster has room for {slots} (one {'GPU' if self.gpus else 'CPU'} "
                  f"each); using {slots}")
            self.workers = slots

    def close(self):
        if self.started and self.ray.is_initialized():
            self.ray.shutdown()
        self.started = False

    # --- the pipeline -------------------------------------------------------------------------
    def _run(self, job, desc, progress):
        """Yield each batch of outputs as it comes back (any order)."""
        from tqdm import tqdm

        ray = self.ray
        n_batches = math.ceil(len(job.dataset) / job.batch_size)
        if n_batches == 0:
            return
        resources = {"num_gpus": 1} if self.gpus else {"num_cpus": 1}
        data = ray.data.from_items([{"batch": b} for b in range(n_batches)], override_num_blocks=n_batches)
        data = data.map_batches(_Worker, fn_constructor_args=(job,), batch_size=1,
                                compute=ray.data.ActorPoolStrategy(size=min(self.workers, n_batches)), **resources)
        bar = tqdm(total=len(job.dataset), desc=desc, unit="img", leave=False, dynamic_ncols=True,
                   disable=not (desc and progress))
        try:
            for out in data.iter_batches(batch_size=None, batch_format="numpy"):
                bar.update(len(out["index"]))
                yield out
        finally:
            bar.close()

    def _device(self, device):
        return "cuda" if self.gpus else "cpu"

    def logits(self, model, dataset, device, batch_size=64, workers=0, desc=None, progress=True):
        job = _Job("logits", model, dataset, batch_size, self._device(device))
        outputs, skipped = [None] * len(dataset), {}
        for out in self._run(job, desc, progress):
            for index, value, error in zip(out["index"], out["value"], out["error"]):
                if error:
                    skipped[int(index)] = str(error)
                else:
                    outputs[int(index)] = value
        return stack_filled(outputs, (0,)), skipped

    def keypoints(self, model, dataset, device, batch_size=64, workers=0, desc=None, progress=True):
        job = _Job("keypoints", model, dataset, batch_size, self._device(device))
        coords, peaks, skipped = [None] * len(dataset), [None] * len(dataset), {}
        for out in self._run(job, desc, progress):
            for index, value, peak, error in zip(out["index"], out["value"], out["peaks"], out["error"]):
                if error:
                    skipped[int(index)] = str(error)
                else:
                    coords[int(index)], peaks[int(index)] = value.reshape(-1, 2), peak
        return stack_filled(coords, (0, 2)), stack_filled(peaks, (0,)), skipped

    def distances(self, model, dataset, layer, members, labels, batch_size, device, rule="hudd", workers=0,
                  progress=True, start=None):
        import assignModule

        members, labels, cluster_ids, _ = assignModule.check_clusters(np.asarray(members), labels)
        job = _Job("distances", model, dataset, batch_size, self._device(device), layer=layer, rule=rule,
                   start=start, members=members, labels=labels, cluster_ids=cluster_ids)
        rows = np.full((len(dataset), len(cluster_ids)), np.nan)
        done = np.zeros(len(dataset), dtype=bool)
        for out in self._run(job, f"heatmaps {layer}", progress):
            index = out["index"].astype(np.int64)
            rows[index] = out["value"]
            done[index] = True
        kept = np.flatnonzero(done)             # unreadable images are skipped, as on the local engine
        return [dataset.images[i] for i in kept], cluster_ids, rows[kept]
