"""The `ray` engine: HUDD's per-image work as Ray Data pipelines (`--engine ray`).

The images are cut into the same batches as the local engine's (`--batch-size` consecutive
images), one Ray Data row per batch, one block per row, so that any actor can take any batch.
Each actor (`--workers` of them, one CPU or one GPU each) holds one copy of the model and, for the
assign step, one copy of the cluster members' heatmaps; it reads its batch's images itself and
returns only their outputs: logits, keypoints, or distances to the clusters. The driver puts them
back in image order, so the results are the local engine's.

Without an address the engine starts a Ray of its own (Ray's address "local"), whatever else runs
on the machine. With one it checks the head first (TCP, gRPC, its auth token) so that a wrong
address or token is one line in seconds, and presents this machine's token to a head that wants it.

A worker that dies is restarted by Ray and its batch retried (Ray Data's actor pools restart
actors and retry their tasks by default), so a lost worker costs time, not results. The
environment variable HUDD_RAY_KILL_ONCE=<file> (for the tests) makes the first worker that finds
<file> missing create it and die mid-batch.
"""
import contextlib
import math
import os
import socket
import sys
from pathlib import Path

import numpy as np

from common.errors import HUDDError
from common.inference import decode_keypoints, stack_filled

ROOT = Path(__file__).resolve().parents[1]
KILL_ONCE = "HUDD_RAY_KILL_ONCE"
UPLOAD_EXCLUDES = [".venv", ".git", "cases", "demo", "*.pth", "*.npy", "*.png", "*.gif", "*.xlsx", "__pycache__"]
CONNECT_TIMEOUT = 5.0
HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
HTTP2_EMPTY_SETTINGS = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"     # length 0, type SETTINGS, no flags, stream 0
HTTP2_SETTINGS = 0x04


def _host_port(address):
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise HUDDError(f"--ray-address {address}: expected auto, HOST:PORT or ray://HOST:PORT")
    return host, int(port)


def _reachable(address, shown=None):
    """A quick TCP check of host:port, so that a wrong address fails in seconds with one clear line.

    `shown` is the address as the user gave it, for the messages (the address itself by default)."""
    try:
        with socket.create_connection(_host_port(address), timeout=CONNECT_TIMEOUT):
            return
    except OSError as exc:
        raise HUDDError(f"--ray-address {shown or address}: cannot connect ({exc.strerror or exc}); start the "
                        f"cluster there (ray start --head) or leave --ray-address out to start Ray on this "
                        f"machine") from None


def _not_a_head(shown, what):
    return HUDDError(f"--ray-address {shown}: answers, but is not a Ray head ({what}); give the port of the "
                     f"head's GCS, the one `ray start --head --port` was given (6379 by default)")


def _speaks_grpc(address, shown):
    """A Ray head's GCS is a gRPC server: it answers the HTTP/2 preface with a SETTINGS frame at once.

    Checked before Ray's own client, which waits 40 s on a port that speaks something else."""
    try:
        with socket.create_connection(_host_port(address), timeout=CONNECT_TIMEOUT) as sock:
            sock.sendall(HTTP2_PREFACE + HTTP2_EMPTY_SETTINGS)
            reply = b""
            while len(reply) < 9:
                chunk = sock.recv(9 - len(reply))
                if not chunk:
                    break
                reply += chunk
    except OSError as exc:
        raise _not_a_head(shown, f"no HTTP/2 reply: {exc.strerror or exc}") from None
    if len(reply) < 9 or reply[3] != HTTP2_SETTINGS:
        raise _not_a_head(shown, f"it replied {reply[:16]!r}, not gRPC")


@contextlib.contextmanager
def _quiet_stderr():
    """Ray's C++ client logs each failed attempt on file descriptor 2; the HUDDError says it once."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _token_source():
    """Where Ray takes this machine's token from, in Ray's order, in words for a message."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return "RAY_AUTH_TOKEN"
    if os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return os.environ["RAY_AUTH_TOKEN_PATH"]
    return "~/.ray/auth_token"


def _token_available():
    """Whether this machine has a token. Ray's loader keeps a token it has read, and a driver holding one
    demands it of the cluster's processes even with RAY_AUTH_MODE=disabled (a cluster without tokens
    then cancels every actor), so its cache is dropped again."""
    from ray._raylet import AuthenticationTokenLoader

    loader = AuthenticationTokenLoader.instance()
    try:
        return loader.has_token(ignore_auth_mode=True)
    finally:
        loader.reset_cache()


def _present_token():
    """Make this process present its token, as Ray does itself for a cluster it finds on this machine."""
    from ray._raylet import AuthenticationTokenLoader, Config

    os.environ["RAY_AUTH_MODE"] = "token"
    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def _authenticate(address, shown=None):
    """Settle how this driver authenticates to the head at `address` before ray.init, in seconds.

    A head started with Ray's defaults (a token in ~/.ray/auth_token) requires its token, but Ray
    presents it only for a cluster it finds itself, not for an address it is given; so a head that
    refuses an anonymous request is asked again with this machine's token (RAY_AUTH_TOKEN,
    RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token). A head started with RAY_AUTH_MODE=disabled is joined
    without one. Refusals and a port that is not a head's GCS are one HUDDError naming `shown`.
    """
    from ray._raylet import GcsClient
    from ray.exceptions import AuthenticationError, RpcError

    shown = shown or address
    _speaks_grpc(address, shown)
    target = "{}:{}".format(*_host_port(address))

    def refused():
        with _quiet_stderr():
            try:
                GcsClient(address=target, cluster_id=None)
            except AuthenticationError:
                return True
            except RpcError as exc:
                raise _not_a_head(shown, f"a gRPC server without Ray's GCS: status {exc.rpc_code}") from None
        return False

    fix = ("copy the head's ~/.ray/auth_token to this machine, or export RAY_AUTH_TOKEN=<the output of "
           "`ray get-auth-token` on the head>")
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if path and not os.environ.get("RAY_AUTH_TOKEN") and not (os.path.isfile(path) and Path(path).read_text().strip()):
        raise HUDDError(f"RAY_AUTH_TOKEN_PATH {path}: not a file holding a token (Ray would abort on it); "
                        f"point it at a copy of the head's ~/.ray/auth_token or unset it")
    mode = os.environ.get("RAY_AUTH_MODE")
    has_token = _token_available()
    none_here = HUDDError(f"--ray-address {shown}: the cluster there requires its auth token and this machine "
                          f"has none; {fix}")
    if mode == "token" and not has_token:
        raise none_here
    if not refused():
        return
    if mode == "disabled":
        raise HUDDError(f"--ray-address {shown}: the cluster there requires its auth token, but RAY_AUTH_MODE="
                        f"disabled here; unset RAY_AUTH_MODE and {fix}")
    if not has_token:
        raise none_here
    if mode != "token":
        _present_token()
        if not refused():
            return
    raise HUDDError(f"--ray-address {shown}: the cluster there requires its auth token and refused this machine's "
                    f"token (from {_token_source()}); {fix}")


def _found_cluster():
    """What `--ray-address auto` means, as Ray resolves it: RAY_ADDRESS, else a cluster running on this
    machine (the one the last `ray start` recorded when several run), else the recorded one, which may
    be dead; (address, words for the messages)."""
    from ray._private.services import canonicalize_bootstrap_address
    from ray._private.utils import read_ray_address

    if "://" in os.environ.get("RAY_ADDRESS", ""):
        return os.environ["RAY_ADDRESS"], f"auto ({os.environ['RAY_ADDRESS']}, from RAY_ADDRESS)"
    try:
        address = canonicalize_bootstrap_address("auto")
    except (ConnectionError, ValueError):
        raise HUDDError("--ray-address auto: no Ray cluster runs on this machine and RAY_ADDRESS is not set; start "
                        "one (ray start --head), give its HOST:PORT, or leave --ray-address out to start Ray on "
                        "this machine") from None
    if os.environ.get("RAY_ADDRESS"):
        source = "from RAY_ADDRESS"
    elif address == read_ray_address():
        source = "from this machine's cluster record"
    else:
        source = "running on this machine"
    return address, f"auto ({address}, {source})"


def _first_line(exc):
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


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
            from lrp.engine import layer_relevance

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
                self._start_local(workers, env, options)
            else:
                self._join(address, env, options)
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
            unit = "GPU" if self.gpus else "CPU"
            print(f"[ray] --workers {self.workers}: the cluster has room for {slots} (one {unit} each); using {slots}")
            self.workers = slots

    def _start_local(self, workers, env, options):
        """A Ray of this run's own: address "local" ignores RAY_ADDRESS and any cluster running or recorded here."""
        try:
            self.ray.init(address="local", num_cpus=max(os.cpu_count() or 1, int(workers or 0)),
                          runtime_env={"env_vars": env}, **options)
        except (ConnectionError, RuntimeError, ValueError, OSError) as exc:
            raise HUDDError(f"--engine ray: could not start Ray on this machine ({_first_line(exc)}); see "
                            f"session_latest/logs in Ray's temp folder (/tmp/ray unless RAY_TMPDIR is set), or drop "
                            f"--engine ray to use the local engine") from None

    def _join(self, address, env, options):
        """Join the cluster at `address`, checked first so that a wrong address or token fails in seconds."""
        shown = address
        if address == "auto":
            address, shown = _found_cluster()
        _reachable(address, shown)
        if not address.startswith("ray://"):
            _authenticate(address, shown)
        try:
            self.ray.init(address=address, runtime_env={"working_dir": str(ROOT), "excludes": UPLOAD_EXCLUDES,
                                                        "env_vars": {k: v for k, v in env.items()
                                                                     if k != "PYTHONPATH"}}, **options)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise HUDDError(f"--ray-address {shown}: {_first_line(exc)}; check the cluster with `ray status "
                            f"--address {address}` on its head, or leave --ray-address out to start Ray on this "
                            f"machine") from None

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
