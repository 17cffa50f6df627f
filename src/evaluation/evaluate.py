"""Run a detector over an evaluation dataset and score it with COCO metrics.

Shared by eval.py and evaluation during training.
"""
import logging
import time
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple, Union

from src.data.pipeline import PAD_IMAGE_ID, EvalDataInfo
from src.evaluation.coco_eval import coco_evaluate, load_coco, to_coco_results
from src.utils.progress import Progress
from src.inference.select import postprocess_batch
from src.inference.tta import IDENTITY, view_candidates

if TYPE_CHECKING:
    import mindspore.dataset as ds

    from src.inference.runtime import MindSporeRuntime, OnnxRuntime

logger = logging.getLogger("fcos")


def detect_dataset(runtime: "Union[MindSporeRuntime, OnnxRuntime]", dataset: "ds.Dataset", num_batches: int,
                   batch_size: int, selection: Dict[str, Any], label_to_cat_id: Sequence[int],
                   views: Sequence[Tuple[int, bool]] = IDENTITY) -> Tuple[List[Dict[str, Any]], List[int]]:
    """-> (COCO results list, ids of the images run). ``runtime``: src.inference.runtime (images ->
    candidates); ``selection``: select_detections kwargs; ``views``: the test-time views
    (src.inference.tta)."""
    results, image_ids = [], []
    progress = Progress(num_batches, batch_size, warmup=1)
    log_every = max(num_batches // 10, 1)
    for images, ids, image_sizes, orig_sizes in dataset.create_tuple_iterator(num_epochs=1, output_numpy=True):
        boxes, scores, labels, view_ids = view_candidates(runtime, images, image_sizes, views)
        detections = postprocess_batch(boxes, scores, labels, image_sizes, original_sizes=orig_sizes, **selection,
                                       view_ids=view_ids, num_views=len(views))
        for image_id, det in zip(ids, detections):
            if image_id == PAD_IMAGE_ID:
                continue
            image_ids.append(int(image_id))
            results += to_coco_results(image_id, det["boxes"], det["scores"], det["labels"], label_to_cat_id,
                                       selection.get("plus_one", False))
        progress.step()
        progress.bar("eval")
        if progress.done % log_every == 0 or progress.done == num_batches:
            logger.info("eval %d/%d batches, %.2f img/s, ETA %s", progress.done, num_batches,
                        progress.items_per_second(), progress.eta())
    return results, image_ids


def evaluate(runtime: "Union[MindSporeRuntime, OnnxRuntime]", dataset: "ds.Dataset", info: EvalDataInfo,
             ann_file: str, selection: Dict[str, Any], output_dir: Optional[str] = None, batch_size: int = 1,
             views: Sequence[Tuple[int, bool]] = IDENTITY) -> Optional[Dict[str, float]]:
    """Detect every image of ``dataset`` with ``runtime`` (src.inference.runtime) on ``views``
    (src.inference.tta) and return the COCO metrics dict (see coco_eval), scored over the images
    actually run (``info`` from create_eval_dataset counts those skipped); None, with an error
    logged, when not a single image could be read."""
    infer_cell = runtime.infer_cell
    was_training = infer_cell.training
    infer_cell.set_train(False)
    start = time.perf_counter()
    results, image_ids = detect_dataset(runtime, dataset, info.batches, batch_size, selection,
                                        info.label_to_cat_id, views)
    infer_cell.set_train(was_training)
    logger.info("detected %d boxes on %d images in %.1f s (%s)", len(results), len(image_ids),
                time.perf_counter() - start, runtime.name)
    failed = info.failed_images
    if info.skipped_missing or len(failed):
        logger.warning("COCO metrics cover the %d images run; not run: %d missing image files, %d undecodable %s",
                       len(image_ids), info.skipped_missing, len(failed), failed.paths()[:3] or "")
    if not image_ids:
        logger.error("no image of %s could be read: nothing to score", ann_file)
        return None
    return coco_evaluate(load_coco(ann_file), results, output_dir, image_ids=image_ids)
