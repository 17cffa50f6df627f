"""Train FCOS: python train.py --train_img_dir=... --train_ann_file=... [--key=value ...]

Standalone or data parallel (launched by scripts/run_distribute_train*.sh); everything the run
writes (logs, checkpoints, evaluation results) lands under --output_dir.
"""
import json
import logging
import os
import time
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import src  # noqa: F401  (sets the oneDNN ISA before mindspore loads)
import mindspore as ms
import mindspore.dataset as ds

from src.builder import (build_eval_dataset, build_inference, build_model, build_train_dataset, build_train_step,
                         eval_graphs, precompile_graphs, selection_kwargs, train_graphs, tta_views)
from src.data.pipeline import FailedImages, loader_error
from src.engine.compile_cache import PlannedGraph
from src.engine.checkpoint import load_weights, read_training_checkpoint
from src.evaluation.coco_eval import check_category_count
from src.utils.context import init_context
from src.utils.logs import setup_logging
from src.evaluation.evaluate import evaluate
from src.engine.trainer import Trainer, TrainingStopped
from src.inference.runtime import MindSporeRuntime
from src.model.fcos import FCOS
from src.config import Config, ConfigError, guard_main, load_config, require_files

logger = logging.getLogger("fcos")


def epoch_batches(dataset: ds.Dataset, first_epoch: int, epochs: int,
                  on_epoch_start: Optional[Callable[[int], None]] = None,
                  on_epoch_end: Optional[Callable[[int], None]] = None) -> Callable[[int, int], Iterator[list]]:
    """make_dataset for Trainer: one iterator over the remaining epochs; MindSpore's iterator
    ends each epoch with StopIteration and continues with the next one on the next loop.
    on_epoch_start(epoch) and on_epoch_end(epoch), when given, run as an epoch starts (or
    resumes) and after its last batch."""
    iterator = dataset.create_tuple_iterator(num_epochs=epochs - first_epoch)

    def make(epoch: int, start_batch: int) -> Iterator[list]:
        if on_epoch_start:
            on_epoch_start(epoch)
        for index, batch in enumerate(iterator):
            if index >= start_batch:
                yield batch
        if on_epoch_end:
            on_epoch_end(epoch)

    return make


def failed_image_reporter(failed: FailedImages) -> Callable[[int], None]:
    """on_epoch_end: log how many images failed to decode so far (FailedImages), when any did."""

    def report(epoch: int) -> None:
        if len(failed):
            logger.warning("after epoch %d: %d images so far could not be decoded and were replaced in their "
                           "batches by other images, e.g. %s", epoch + 1, len(failed), failed.paths()[:3])

    return report


def batch_id_logger(plan: Callable[[int], Sequence[Tuple[int, Sequence[int]]]], rank: int) -> Callable[[int], None]:
    """on_epoch_start for --log_batch_ids: log the image ids of every batch of this rank's epoch
    (plan: epoch -> [(bucket, [image ids])]), to see which device trains on what and to find the
    images of a failing step."""

    def log(epoch: int) -> None:
        ids = [[int(i) for i in image_ids] for _, image_ids in plan(epoch)]
        logger.info("epoch %d: image ids of the %d batches of rank %d: %s", epoch + 1, len(ids), rank,
                    json.dumps(ids))

    return log


def build_evaluator(cfg: Config, network: FCOS) -> Tuple[Optional[Callable[[], Optional[dict]]], List[PlannedGraph]]:
    """Evaluation during training -> (evaluate function, its graphs); (None, []) when not configured."""
    if not cfg.eval_interval:
        return None, []
    require_files(cfg, "val_img_dir", "val_ann_file")
    dataset, info = build_eval_dataset(cfg, batch_size=cfg.batch_size)
    infer_cell = build_inference(cfg, network)
    count = [0]

    def run() -> Optional[dict]:
        # each evaluation its own folder (run_eval.sh writes <output_dir>/eval): nothing overwritten
        count[0] += 1
        out_dir = os.path.join(cfg.output_dir, "train_eval", f"{time.strftime('%Y%m%d-%H%M%S')}-{count[0]}")
        return evaluate(MindSporeRuntime(infer_cell), dataset, info, cfg.val_ann_file, selection_kwargs(cfg), out_dir,
                        batch_size=cfg.batch_size, views=tta_views(cfg))

    return run, eval_graphs(infer_cell, info.pad_shapes, cfg.batch_size, tta_views(cfg))


def load_initial_weights(cfg: Config, network: FCOS) -> None:
    if cfg.pretrained:
        require_files(cfg, "pretrained_backbone")
        try:
            load_weights(network, cfg.pretrained_backbone, strict_prefixes=("backbone.",))
        except (FileNotFoundError, ValueError) as err:
            raise ConfigError(f"--pretrained_backbone: {err}") from None
        logger.info("backbone initialised from %s", cfg.pretrained_backbone)
    else:
        logger.info("training from scratch (--pretrained=False)")


@guard_main
def main(argv: Optional[Sequence[str]] = None) -> None:
    cfg = load_config(argv, description="Train FCOS.")
    require_files(cfg, "train_img_dir", "train_ann_file")
    rank, group_size = init_context(cfg.device_target, cfg.mode, cfg.device_id)
    setup_logging(cfg.output_dir, rank, "train")
    ms.set_seed(cfg.seed)
    resume = None
    if cfg.resume:
        try:
            resume = read_training_checkpoint(cfg.resume)
        except (FileNotFoundError, ValueError) as err:
            raise ConfigError(f"--resume: {err}") from None

    dataset, info = build_train_dataset(cfg, rank, group_size, start_epoch=resume.epoch if resume else 0)
    check_category_count(len(info.label_to_cat_id), cfg.class_num, cfg.train_ann_file)
    steps_per_epoch = info.batches_per_epoch
    logger.info("rank %d/%d: %d training images, %d batches of %d per epoch, pad shapes %s", rank, group_size,
                info.num_images, steps_per_epoch, cfg.batch_size, info.buckets)
    if info.generated_per_epoch:
        logger.info("%d procedural tree-crown stands an epoch among the samples (--synthetic_crowns=%g)",
                    info.generated_per_epoch, cfg.synthetic_crowns)

    network = build_model(cfg)
    load_initial_weights(cfg, network)
    # Ranks other than 0 write checkpoints only on request, each into its own folder.
    ckpt_root = cfg.output_dir if rank == 0 else os.path.join(cfg.output_dir, f"rank_{rank}")
    train_step, schedule = build_train_step(cfg, network, steps_per_epoch, group_size)
    evaluator, evaluator_graphs = build_evaluator(cfg, network) if rank == 0 else (None, [])
    trainer = Trainer(train_step, steps_per_epoch=steps_per_epoch, epochs=cfg.epochs,
                      global_batch=cfg.batch_size * group_size, lr_schedule=schedule, output_dir=ckpt_root,
                      save_checkpoints=rank == 0 or cfg.save_ckpt_all_ranks, log_interval=cfg.log_interval,
                      save_ckpt_epochs=cfg.save_ckpt_epochs, save_ckpt_steps=cfg.save_ckpt_steps,
                      keep_ckpt_max=cfg.keep_ckpt_max, max_bad_steps=cfg.max_bad_steps, eval_interval=cfg.eval_interval,
                      evaluate=evaluator)
    if resume is not None:
        try:
            trainer.resume_from(resume)
        except ValueError as err:
            raise ConfigError(f"--resume: {err}") from None
    precompile_graphs(cfg, train_graphs(cfg, train_step, info.pad_shapes) + evaluator_graphs, group_size > 1)
    on_epoch_start = batch_id_logger(info.plan, rank) if cfg.log_batch_ids else None
    batches = epoch_batches(dataset, trainer.epoch, cfg.epochs, on_epoch_start,
                            failed_image_reporter(info.failed_images))
    try:
        finished = trainer.run(batches)
    except TrainingStopped as err:
        logger.error("%s", err)
        raise SystemExit(1) from None
    except RuntimeError as err:  # MindSpore's wrapping of an error in a data-loading worker
        cause = loader_error(err)
        if cause is None:
            raise
        raise ConfigError(f"--train_img_dir: {cause}") from None
    if not finished:
        raise SystemExit(130)


if __name__ == "__main__":
    main()
