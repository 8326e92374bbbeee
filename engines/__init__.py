"""How HUDD's per-image work runs: `local` (this process, the default) or `ray` (Ray Data actors).

The test step's inference and the assign step's improvement heatmaps and single-linkage distances
are embarrassingly parallel; the clustering of the test errors is not, and stays in this process.
Both engines offer the same three operations over an ImageSet, with the same results:

    logits(model, dataset, device, batch_size, workers, desc, progress) -> (N, K) float32, {index: reason}
    keypoints(model, dataset, ...)                 -> (N, K, 2) coordinates, (N, K) peaks, {index: reason}
    distances(model, dataset, layer, members, labels, ...) -> (keys, cluster ids, (M, K) distances)

Only each image's outputs (its logits, keypoints or distances to the clusters) come back, never
its heatmaps, so memory is flat in the number of improvement images on both engines. Ray is
imported only when the `ray` engine is chosen.
"""
from common.errors import HUDDError
from common.inference import predict, predict_keypoints

ENGINES = ("local", "ray")


class LocalEngine:
    """Today's path: one process, batches from a DataLoader (`workers` loading processes)."""

    name = "local"

    def logits(self, model, dataset, device, batch_size=64, workers=0, desc=None, progress=True):
        return predict(model, dataset, device, batch_size, workers, desc=desc, progress=progress)

    def keypoints(self, model, dataset, device, batch_size=64, workers=0, desc=None, progress=True):
        return predict_keypoints(model, dataset, device, batch_size, workers, desc=desc, progress=progress)

    def distances(self, model, dataset, layer, members, labels, batch_size, device, rule="hudd", workers=0,
                  progress=True, start=None):
        import assignModule

        batches = assignModule.improvement_heatmaps(model, dataset, layer, batch_size, device, rule=rule,
                                                    workers=workers, progress=progress, start=start)
        return assignModule.cluster_distances(members, labels, batches)

    def close(self):
        pass


def make_engine(name="local", address=None, workers=0):
    """The engine called `name`; `address` and `workers` (actors; 0 = one per CPU, or per GPU) are Ray's."""
    if name == "local":
        if address:
            raise HUDDError(f"--ray-address {address}: only used with --engine ray; add --engine ray or drop it")
        return LocalEngine()
    if name == "ray":
        from engines.rayengine import RayEngine

        return RayEngine(address, workers)
    raise HUDDError(f"--engine {name}: unknown; choose one of {', '.join(ENGINES)}")
