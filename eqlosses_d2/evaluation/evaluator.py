"""
Detectron2's ``LVISEvaluator`` with the lvis-api evaluation replaced by
:func:`~.evaluate.evaluate_lvis`, and the results kept, gathered and saved as arrays
(:mod:`.results`). Fixed AP's per-category pools: :class:`~.results.CategoryPools`;
score floors handed to the model: ``score_floor_consumers``.
"""
import json
import os

import numpy as np
import torch

from ..atomic import atomic_write
from ..compat import apply_detectron2_patches
from .boundary import evaluate_lvis_boundary
from .evaluate import evaluate_lvis_detailed, per_category_records
from .ground_truth import LVISGroundTruth
from .params import DEFAULT_MAX_DETS
from .plot import plot_or_warn, plot_per_category_ap
from .results import CategoryPools, ResultArrays, compact_instances

apply_detectron2_patches()  # idempotent; detectron2.evaluation needs it without the C++ extension

from detectron2.evaluation import LVISEvaluator as _Detectron2LVISEvaluator  # noqa: E402
from detectron2.utils.logger import create_small_table  # noqa: E402

__all__ = ["LVISEvaluator"]


def _atomic_write_json(path, obj):
    atomic_write(path, lambda f: json.dump(obj, f, indent=1, allow_nan=False), binary=False)


class LVISEvaluator(_Detectron2LVISEvaluator):
    """
    Detectron2's ``LVISEvaluator`` (same arguments, ``process``/``reset``, gathering,
    proposal evaluation, saved files), with the lvis-api evaluation replaced by
    :func:`evaluate_lvis`. Each image's results are kept as arrays
    (:func:`~.results.compact_instances`), not as a dict per detection, so what the
    processes gather on the main process, and what it holds while evaluating, is a
    fraction of Detectron2's (``benchmarks/bench_lvis_eval.py --held``);
    ``lvis_instances_results.json`` is still Detectron2's file, byte for byte, written in
    chunks, and ``instances_predictions.pth`` holds those per-image arrays (plain dicts of
    numpy arrays and RLE strings). Each task's metrics (:data:`LVIS_METRICS`, x 100) are
    logged as a table, and with ``output_dir`` the per-category AP is written to
    ``<output_dir>/lvis_per_category_<task>.json`` and plotted against the training image
    count in ``lvis_per_category_<task>.png``.

    ``pooled=True`` adds Pooled AP (:data:`POOLED_METRICS`) to each task's metrics;
    ``boundary=True`` adds a task "boundary": Boundary AP of the masks
    (:mod:`eqlosses_d2.evaluation.boundary`).

    ``max_dets_per_category=K`` evaluates Fixed AP (pass ``max_dets_per_image=-1``):
    results are pooled per category as they arrive, as arrays
    (:class:`~.results.CategoryPools`: a pool is cut back to its top K whenever it holds
    2K, so it holds fewer than 2K after every image), and each process sends only each
    category's top K to the main process, which keeps the top K of those: the same
    results as one cut of everything. After each cut the K-th best score of the category
    is handed to every object in ``score_floor_consumers`` as ``test_score_floor`` ((C,)
    tensor, -inf where the pool was never cut; the RoI heads of eqlosses_d2 drop
    detections below it before their mask head). All exact: a result below this
    process's K-th best can never be in the final top K. Per process, the pools hold at
    most ``sum over classes of min(n_c, 2K - 1)`` results (n_c: the class's results on
    that process), about 60 bytes each plus the mask's RLE string; the main process
    receives at most ``world_size x sum_c min(n_c, K)``.
    """

    def __init__(self, dataset_name, tasks=None, distributed=True, output_dir=None, *,
                 max_dets_per_image=None, max_dets_per_category=None, pooled=False, boundary=False):
        super().__init__(dataset_name, tasks, distributed, output_dir, max_dets_per_image=max_dets_per_image)
        self._pooled = pooled
        self._boundary = boundary
        if max_dets_per_category is not None and max_dets_per_category <= 0:
            raise ValueError(f"max_dets_per_category must be > 0, got {max_dets_per_category}")
        self._max_dets_per_category = max_dets_per_category
        self.score_floor_consumers = []
        self.reset()

    def reset(self):
        super().reset()
        k = self._max_dets_per_category
        num_classes = len(self._metadata.thing_classes)
        self._pools = None if k is None else CategoryPools(k, num_classes)
        self._set_score_floor(None)

    def _set_score_floor(self, floor):
        for consumer in self.score_floor_consumers:
            consumer.test_score_floor = floor

    def process(self, inputs, outputs):
        # Detectron2's per-image entries, with the results as arrays (compact_instances);
        # under Fixed AP the results go to the category pools instead
        for input, output in zip(inputs, outputs):
            prediction = {"image_id": input["image_id"]}
            if "instances" in output:
                record = compact_instances(output["instances"], input["image_id"])
                if self._pools is None:
                    prediction["instances"] = record
                else:
                    self._pool(record)
            if "proposals" in output:
                prediction["proposals"] = output["proposals"].to(self._cpu_device)
            if self._pools is None or "proposals" in prediction:
                self._predictions.append(prediction)

    def _pool(self, record):
        nan = np.isnan(record["scores"])
        if nan.any():  # the cut would sort them last and drop them unseen
            raise ValueError(
                f"image_id {record['image_id']}: {int(nan.sum())} detection(s) have a NaN score; scores rank the "
                "detections, so Fixed AP's per-category cut (and every metric) would be undefined"
            )
        results = ResultArrays.from_records([record], np.arange(len(self._pools.floor)))  # contiguous classes
        if self._pools.add(results):
            self._set_score_floor(torch.from_numpy(self._pools.floor.copy()))

    def evaluate(self):
        self._set_score_floor(None)
        if self._pools is not None:
            # one entry with each category's top K (as a plain record of arrays) before
            # Detectron2 gathers the processes' lists
            pooled = self._pools.results()
            self._predictions = [{"image_id": None, "instances": pooled.to_record()}] + self._predictions
            self._pools = CategoryPools(self._max_dets_per_category, len(self._pools.floor))
        return super().evaluate()

    def _lvis_ground_truth(self) -> LVISGroundTruth:
        gt = getattr(self, "_prepared_lvis_gt", None)
        if gt is None:
            gt = self._prepared_lvis_gt = LVISGroundTruth(self._lvis_api)
        return gt

    def _eval_predictions(self, predictions):
        """Detectron2's ``_eval_predictions`` on the arrays of :meth:`process`: the same
        category-id mapping, results file (byte for byte) and tasks, without building a
        dict per detection."""
        self._logger.info("Preparing results in the LVIS format ...")
        id_map = getattr(self._metadata, "thing_dataset_id_to_contiguous_id", None)
        dataset_ids = None  # LVIS: 0-based contiguous ids to 1-based category ids
        if id_map is not None:  # COCO categories evaluated with the LVIS evaluator
            reverse = {v: k for k, v in id_map.items()}
            dataset_ids = [reverse[k] for k in range(len(reverse))]
        results = ResultArrays.from_records([p["instances"] for p in predictions if "instances" in p], dataset_ids)
        tasks = self._tasks or (("bbox", "segm") if results.has_masks else ("bbox",))
        if self._output_dir:
            path = os.path.join(self._output_dir, "lvis_instances_results.json")
            self._logger.info("Saving results to {}".format(path))
            atomic_write(path, results.write_json, binary=False)
        if not self._do_evaluation:
            self._logger.info("Annotations are not available for evaluation.")
            return
        self._logger.info("Evaluating predictions ...")
        max_dets = DEFAULT_MAX_DETS if self._max_dets_per_image is None else self._max_dets_per_image
        for task in sorted(tasks):
            if task == "segm" and self._boundary:
                self._results["boundary"] = self._evaluate_boundary(results.to_dicts(), max_dets)
            self._results[task] = self._evaluate_task(results, task, max_dets)

    def _evaluate_boundary(self, lvis_results, max_dets_per_image):
        self._logger.info("Evaluating Boundary AP (lvis-api matching with Boundary IoU; slow) ...")
        metrics = evaluate_lvis_boundary(self._lvis_ground_truth(), lvis_results, max_dets_per_image)
        self._logger.info("Boundary AP: \n" + create_small_table(metrics))
        return metrics

    def _evaluate_task(self, lvis_results, iou_type, max_dets_per_image):
        per_category = self._max_dets_per_category
        self._logger.info(
            f"Evaluating {iou_type} with max detections per image = {max_dets_per_image}"
            + ("" if per_category is None else f", per category = {per_category} (Fixed AP)")
        )
        result = evaluate_lvis_detailed(
            self._lvis_ground_truth(), lvis_results, iou_type, max_dets_per_image, per_category, self._pooled
        )
        self._logger.info(
            f"Evaluation results for {iou_type} ({result.backend}): \n" + create_small_table(result.metrics)
        )
        if self._output_dir:
            records = per_category_records(result)
            path = os.path.join(self._output_dir, f"lvis_per_category_{iou_type}.json")
            _atomic_write_json(path, records)
            plot = os.path.splitext(path)[0] + ".png"
            title = f"{self._metadata.name}: {iou_type} AP per category"
            plotted = plot_or_warn(plot_per_category_ap, records, path=plot, title=title) is not None  # never raises
            where = f"{path}, plotted in {plot}" if plotted else path
            self._logger.info(f"Per-category {iou_type} AP saved to {where}")
        return dict(result.metrics)
