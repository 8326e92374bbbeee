"""The case folder under analysis: its layout, its model (loaded once), its engine and its lock, and
what the steps read back from it (the error images, the kept heatmap layers, the selected clusters)."""
import fcntl
import os
from pathlib import Path

from common.errors import HUDDError
from pipeline.options import Options


class Case:
    """One case folder under analysis with one model; loads what it needs once, lazily."""

    def __init__(self, case_dir, model_name="OriginalModel.pth", options=None):
        import models

        self.dir = Path(case_dir)
        self.options = options or Options()
        if not self.dir.is_dir():
            raise HUDDError(f"{self.dir}: no such case folder; pass -o with a folder that holds DataSets/ "
                            f"(python -m casestudies gaze -o {self.dir} builds one)")
        self.t = self.dir / "T"
        self.datasets = self.dir / "DataSets"
        self.model_path = models.resolve_model_path(self.dir, model_name)
        self._model = self._splits = self._classes = self._loaded = self._engine = None
        self._lock = None

    # --- what the steps share -------------------------------------------------------------
    def _load(self):
        if self._loaded is None:
            import models
            from common.data import resolve_device

            self._loaded = models.load_model(self.model_path, resolve_device(self.options.device),
                                             trust=self.options.trust_model)
        return self._loaded

    @property
    def keypoints(self):
        """True for a keypoint regressor (model task "keypoints"): splits are flat folders with labels.csv."""
        from testModule import is_keypoint_task

        return is_keypoint_task(self._load()[1])

    @property
    def splits(self):
        from common.data import list_case
        from testModule import list_keypoint_case

        if self._splits is None:
            self._splits = list_keypoint_case(self.dir, self._load()[1]["classes"]) if self.keypoints \
                else list_case(self.dir)
        return self._splits

    @property
    def model(self):
        """(model, meta) with the classes checked against the class folders (keypoint names: their components)."""
        if self._model is None:
            from testModule import check_classes, keypoint_components

            model, meta = self._load()
            meta = dict(meta)
            if self.keypoints:
                keypoint_components(meta)
            else:
                meta["classes"] = check_classes(meta, self.splits, self.model_path)
            if meta.get("input_size") is None:
                raise HUDDError(f"{self.model_path}: the pickled model names no input size; re-save it with "
                                f"models.save_model(..., input_size=(C, H, W), mean=..., std=...)")
            self._model = (model, meta)
        return self._model

    @property
    def engine(self):
        """The engine of the per-image work (engines.make_engine), started on first use."""
        if self._engine is None:
            from engines import make_engine

            self._engine = make_engine(self.options.engine, self.options.ray_address, self.options.workers)
        return self._engine

    def close(self):
        if self._engine is not None:
            self._engine.close()
            self._engine = None

    @property
    def device(self):
        from common.data import resolve_device

        return resolve_device(self.options.device)

    # --- lock -----------------------------------------------------------------------------
    def lock(self):
        """Refuse a second run on the same case folder; the kernel drops the lock if a run is killed."""
        try:
            self.t.mkdir(parents=True, exist_ok=True)
            handle = open(self.t / ".lock", "a+")
        except PermissionError:
            raise HUDDError(f"{self.dir}: not writable; HUDD writes its results to {self.t}: copy the case "
                            f"folder somewhere writable or fix its permissions") from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            owner = handle.read().strip() or "another process"
            handle.close()
            raise HUDDError(f"{self.dir}: another HUDD run ({owner}) is using this case folder; wait for it "
                            f"to finish or stop it") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}")
        handle.flush()
        self._lock = handle

    def unlock(self):
        if self._lock:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()
            self._lock = None


def error_images(case):
    """The test set's error images, in testResult.csv order (the rows of every heatmap array)."""
    from testModule import read_results

    frame = read_results(case.dir / "testResult.csv")
    wrong = frame[frame["result"] == "Wrong"].reset_index(drop=True)
    if wrong.empty:
        raise HUDDError(f"{case.dir / 'testResult.csv'}: the DNN makes no errors on the test set, so there is "
                        f"nothing to debug; add harder test images or check the model")
    return wrong


def heatmap_layers(case):
    """The kept layers of the heatmap step, in forward order, and the error images (heatmap rows)."""
    from common.tables import read_table

    hint = "rerun the heatmaps step (python HUDD.py -o CASE -step heatmaps)"
    layers = read_table(case.t / "Heatmaps" / "layers.csv", required=("layer", "kept"), missing_hint=hint)
    index = read_table(case.t / "Heatmaps" / "index.csv", required=("image",), missing_hint=hint)
    kept = layers[layers["kept"].astype(str) == "True"]["layer"].tolist()
    return kept, index["image"].tolist()


def selected_clusters(case):
    """The best layer and its clusters: (layer, images, cluster labels) from T/ClusterAnalysis."""
    import clusterModule

    layer = clusterModule.best_layer_from_summary(case.t)
    clusters = clusterModule.read_clusters(case.t, layer)
    return layer, clusters["image"].tolist(), clusters["cluster"].to_numpy()
