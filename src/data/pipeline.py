"""mindspore.dataset pipelines for training and evaluation.

Static shapes for GRAPH_MODE: every image is padded to one of a few pad shapes ("buckets") and a
batch holds one bucket only, so the network compiles once per bucket; ground truth is padded to
``max_gt_boxes`` rows with a validity mask.

Each dataset item is a whole batch, built by a random-access source from a plan of image ids.
Training plans are drawn per epoch from ``seed + epoch`` - the same plan of global batches on
every rank, each rank taking its own slice of every global batch - so that augmentation and order
are reproducible, differ between epochs, never show an image twice in an epoch, and data-parallel
training sees at each step the batch one process with the global batch size would see.
"""
import dataclasses
import logging
import multiprocessing
import os
import re
import typing
from typing import Any, Callable, List, Optional, Sequence, Tuple

import mindspore.dataset as ds
import numpy as np

from .coco import CocoDataset, DatasetError
from src.geometry import EvalGeometry, PadBucketError, box_area, pad_shape_for, resolve_pad_buckets, window_pad_shape

from .transforms import IMAGENET_PIXELS, PixelFormat, TrainTransform, preprocess_image

logger = logging.getLogger("fcos")

TRAIN_COLUMNS = ["images", "gt_boxes", "gt_labels", "gt_mask"]
EVAL_COLUMNS = ["images", "image_ids", "image_sizes", "orig_sizes"]
PAD_IMAGE_ID = -1  # image_ids entry of an evaluation batch slot whose outputs are to be ignored
GENERATED_ID = -2  # image id of a training sample that a GeneratedSamples plug-in makes


def loader_error(err: BaseException) -> Optional[DatasetError]:
    """The DatasetError a batch source raised in a loading worker -> a one-line DatasetError, or
    None when ``err`` is something else. MindSpore hands such errors on as a RuntimeError whose
    message carries the worker's traceback as text, the original error on its last such line."""
    found = re.findall(r"^(?:[\w.]+\.)?DatasetError: (.+)$", str(err), re.MULTILINE)
    return DatasetError(found[-1].strip()) if found else None


def present_images(coco: CocoDataset, image_ids: Sequence[int], purpose: str) -> List[int]:
    """The ids of ``image_ids`` whose file exists; the others are counted in one warning."""
    exists = {i: os.path.isfile(coco.image_path(i)) for i in image_ids}
    missing = [i for i in image_ids if not exists[i]]
    if missing:
        logger.warning("%d %s images skipped: file not found (e.g. %s)", len(missing), purpose,
                       coco.image_path(missing[0]))
    return [i for i in image_ids if exists[i]]


def pad_targets(boxes: np.ndarray, labels: np.ndarray,
                max_gt_boxes: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pad to max_gt_boxes rows -> (boxes (M,4) float32, labels (M,) int32, mask (M,) bool).

    With more than M boxes the M largest (by area) are kept, in their original order.
    """
    if len(boxes) > max_gt_boxes:
        area = box_area(boxes)
        keep = np.sort(np.argsort(-area, kind="stable")[:max_gt_boxes])
        boxes, labels = boxes[keep], labels[keep]
    n = len(boxes)
    out_boxes = np.zeros((max_gt_boxes, 4), np.float32)
    out_labels = np.zeros((max_gt_boxes,), np.int32)
    mask = np.zeros((max_gt_boxes,), np.bool_)
    out_boxes[:n], out_labels[:n], mask[:n] = boxes, labels, True
    return out_boxes, out_labels, mask


def group_by_bucket(coco: CocoDataset, image_ids: Sequence[int], pad_shape: Callable[[Tuple[int, int]], Sequence[int]],
                    buckets: Optional[Sequence[Sequence[int]]] = None) -> Tuple[List[tuple], List[List[int]]]:
    """Image ids -> (buckets, one list of ids per bucket), from the sizes in the annotation file
    (no pixels read).

    pad_shape: image (h, w) -> the (h, w) it is padded to (ValueError when it fits none);
    buckets: the fixed pad shapes, or None for the shapes the images need (per-image padding),
    sorted. PadBucketError names the first image that fits none.
    """
    shapes = {}
    for image_id in image_ids:
        info = coco.image_info(image_id)
        try:
            shapes[image_id] = tuple(pad_shape((info["height"], info["width"])))
        except ValueError as err:
            raise PadBucketError(f"{err}: {coco.image_path(image_id)}") from None
    buckets = sorted(set(shapes.values())) if buckets is None else [tuple(b) for b in buckets]
    members = [[] for _ in buckets]
    for image_id, shape in shapes.items():
        members[buckets.index(shape)].append(image_id)
    return buckets, members


def used_pad_shapes(buckets: Sequence[tuple], batches: Sequence[tuple]) -> List[tuple]:
    """The (h, w) buckets that ``batches`` (tuples whose first item is a bucket index) use, in
    bucket order."""
    return [buckets[b] for b in sorted({batch[0] for batch in batches})]


def plan_train_epoch(members: Sequence[Sequence[int]], batch_size: int, seed: int, epoch: int, rank: int = 0,
                     group_size: int = 1, shuffle: bool = True) -> List[Tuple[int, List[int]]]:
    """The batches rank ``rank`` trains on in ``epoch`` -> list of (bucket, [image ids]).

    Every rank draws the same plan from seed + epoch: each bucket's images are shuffled and cut
    into full global batches of batch_size * group_size images (a bucket's incomplete last one
    waits for another epoch), and the global batches are shuffled. Rank r takes the r-th slice of
    batch_size images of each, so that G ranks of batch b train, step by step, on the images one
    process of batch G*b would, and every step has one pad shape on all ranks. ``shuffle=False``
    keeps the given image order and the buckets in turn.
    """
    rng = np.random.default_rng(seed + epoch)
    global_batch = batch_size * group_size
    own = slice(rank * batch_size, (rank + 1) * batch_size)
    batches = []
    for bucket, ids in enumerate(members):
        order = rng.permutation(len(ids)) if shuffle else np.arange(len(ids))
        for start in range(0, len(ids) - global_batch + 1, global_batch):
            batches.append((bucket, [ids[i] for i in order[start:start + global_batch][own]]))
    if shuffle:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


class FailedImages:
    """Images whose file failed to decode, flagged in shared memory so that every loading worker
    skips them and the main process can count them (``len``) and name them (``paths``)."""

    def __init__(self, coco: CocoDataset, image_ids: Sequence[int]) -> None:
        self._coco = coco
        self._ids = list(image_ids)
        self._index = {image_id: i for i, image_id in enumerate(self._ids)}
        self._flags = multiprocessing.Array("b", len(self._ids))

    def __contains__(self, image_id):
        return bool(self._flags[self._index[image_id]])

    def mark(self, image_id: int, error: Any) -> None:
        """Flag an image; the first process to flag it logs the error."""
        with self._flags.get_lock():
            first = not self._flags[self._index[image_id]]
            self._flags[self._index[image_id]] = 1
        if first:
            logger.warning("skipping an image that failed to load (%s)", error)

    def __len__(self):
        return sum(self._flags[:])

    def paths(self) -> List[str]:
        return [self._coco.image_path(i) for i, flag in zip(self._ids, self._flags[:]) if flag]


class EpochSampler(ds.Sampler):
    """Yields epoch * num_batches + slot for slot in 0..num_batches-1; the epoch counter runs in
    the main process and travels to the loading workers inside the index.

    Every pass over the dataset is the next epoch, also through a new iterator: MindSpore
    deep-copies the pipeline for each iterator, and the copies share this one counter. A shape
    probe (``output_shapes``, ``output_types``) is a pass too, so call those before training or
    not at all when the epoch sequence must match a previous run.
    """

    def __init__(self, num_batches: int, start_epoch: int = 0) -> None:
        self.num_batches = num_batches
        self.epoch = start_epoch
        super().__init__()

    def __deepcopy__(self, memo):
        return self

    def __iter__(self):
        epoch, self.epoch = self.epoch, self.epoch + 1
        return iter(range(epoch * self.num_batches, (epoch + 1) * self.num_batches))

    def __len__(self):
        return self.num_batches


def window_samples(coco: CocoDataset, image_ids: Sequence[int], window: int) -> List[Tuple[int, int]]:
    """Training samples of window mode: image id i appears max(1, round(h_i * w_i / window^2))
    times -> list of (image_id, copy), so that each epoch cuts about as many windows from an
    image as it would have tiles; large images are seen in proportion to their area."""
    samples = []
    for image_id in image_ids:
        info = coco.image_info(image_id)
        copies = max(1, round(info["height"] * info["width"] / window ** 2))
        samples.extend((image_id, copy) for copy in range(copies))
    return samples


class GeneratedSamples(typing.Protocol):
    """The training pipeline's one plug-in point: a source of generated samples mixed into an
    epoch next to the real ones (e.g. src/data/synthetic_crowns.py CrownStands)."""

    def count(self, num_real: int) -> int:
        """Generated samples an epoch next to num_real real ones."""

    def make(self, rng: np.random.Generator) -> tuple:
        """One sample -> (image (H, W, 3) uint8 RGB, boxes (K, 4) float32, labels (K,) int32)."""


def generated_samples(num_real: int, generated: Optional[GeneratedSamples]) -> List[Tuple[int, int]]:
    """-> [(GENERATED_ID, k)]: the generated samples of an epoch next to num_real real ones."""
    return [(GENERATED_ID, k) for k in range(generated.count(num_real) if generated else 0)]


class TrainBatches:
    """Random-access source of training batches: index (from EpochSampler) -> (images (B,3,H,W)
    float32, gt_boxes (B,M,4) float32, gt_labels (B,M) int32, gt_mask (B,M) bool).

    ``samples`` lists (image_id, copy) pairs and ``members`` holds, per bucket, indices into it:
    an image with several copies (window mode) gives that many differently augmented samples an
    epoch, each drawn from its own (seed, epoch, image id, copy) stream. Samples with image id
    GENERATED_ID come from the ``generated`` plug-in, a new one every epoch.
    """

    def __init__(self, coco: CocoDataset, samples: List[Tuple[int, int]], members: Sequence[Sequence[int]],
                 buckets: Sequence[Tuple[int, int]], transform: TrainTransform, *, batch_size: int, max_gt_boxes: int,
                 seed: int, rank: int, group_size: int, shuffle: bool, failed: FailedImages,
                 generated: Optional[GeneratedSamples] = None) -> None:
        self.coco = coco
        self.generated = generated
        self.samples = samples
        self.members = members
        self.buckets = buckets
        self.transform = transform
        self.max_gt_boxes = max_gt_boxes
        self.seed = seed
        self.failed = failed
        self._plan_args = (batch_size, rank, group_size, shuffle)
        self._cached = (0, self._sample_plan(0))
        self.num_batches = len(self._cached[1])

    def _sample_plan(self, epoch):
        """-> [(bucket, [sample indices])] of ``epoch``, see plan_train_epoch."""
        batch_size, rank, group_size, shuffle = self._plan_args
        return plan_train_epoch(self.members, batch_size, self.seed, epoch, rank, group_size,
                                shuffle)

    def plan(self, epoch: int) -> List[Tuple[int, List[int]]]:
        """This rank's batches of ``epoch``: list of (bucket, [image ids])."""
        return [(bucket, [self.samples[i][0] for i in indices])
                for bucket, indices in self._sample_plan(epoch)]

    def __len__(self):
        return self.num_batches

    def __getitem__(self, index):
        epoch, slot = divmod(int(index), self.num_batches)
        if self._cached[0] != epoch:
            self._cached = (epoch, self._sample_plan(epoch))
        bucket, indices = self._cached[1][slot]
        pad_hw = self.buckets[bucket]
        used = set(indices)
        samples = []
        for index in indices:
            index, image, boxes, labels, rng = self._example(index, bucket, epoch, used)
            used.add(index)
            chw, boxes, labels = self.transform(image, boxes, labels, pad_hw, rng)
            samples.append((chw, *pad_targets(boxes, labels, self.max_gt_boxes)))
        return tuple(np.stack(column) for column in zip(*samples))

    def _example(self, index, bucket, epoch, used):
        """Sample index -> (index actually used, image (H,W,3) uint8, boxes (K,4), labels (K,),
        the sample's random stream for its augmentation)."""
        image_id, copy = self.samples[index]
        if image_id == GENERATED_ID:
            rng = np.random.default_rng([self.seed, epoch, 2 ** 32, copy])  # apart from image ids
            return (index, *self.generated.make(rng), rng)
        index, image = self._load(index, bucket, epoch, used)
        image_id, copy = self.samples[index]
        boxes, labels = self.coco.targets(image_id)
        # copy 0 keeps the stream of a plain (seed, epoch, image id) key
        rng = np.random.default_rng([self.seed, epoch, image_id] + ([copy] if copy else []))
        return index, image, boxes, labels, rng

    def _load(self, index, bucket, epoch, used):
        """Sample index -> (index, image); an image that fails to load is flagged and the sample
        replaced by a random other one of the same bucket, not in the batch yet, whose image
        loads."""
        pick = np.random.default_rng([self.seed, epoch, self.samples[index][0], 1])
        while True:
            image_id = self.samples[index][0]
            if image_id not in self.failed:
                try:
                    return index, self.coco.load_image(image_id)
                except DatasetError as err:
                    self.failed.mark(image_id, err)
            candidates = [i for i in self.members[bucket] if i not in used
                          and self.samples[i][0] != GENERATED_ID and self.samples[i][0] not in self.failed]
            if not candidates:
                raise DatasetError(f"no loadable image left to fill a batch of pad bucket "
                                   f"{self.buckets[bucket]}; failed: {self.failed.paths()[:3]}")
            index = candidates[int(pick.integers(len(candidates)))]


class EvalBatches:
    """Random-access source of evaluation batches: index -> (images (B,3,H,W) float32, image_ids
    (B,) int32, image_sizes (B,2) int32 resized (h, w), orig_sizes (B,2) int32).

    A slot whose image id is PAD_IMAGE_ID keeps shapes static and its outputs must be ignored: it
    repeats another image of the batch, or it is an image that failed to load (flagged in
    ``failed``), left as zeros.
    """

    def __init__(self, coco: CocoDataset, batches: Sequence[Tuple[int, List[int], List[bool]]],
                 buckets: Sequence[Tuple[int, int]], geometry: EvalGeometry, pixels: PixelFormat,
                 failed: FailedImages) -> None:
        self.coco = coco
        self.batches = batches
        self.buckets = buckets
        self.geometry = geometry
        self.pixels = pixels
        self.failed = failed

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, index):
        bucket, image_ids, real = self.batches[int(index)]
        pad_hw = self.buckets[bucket]
        loaded = {image_id: self._load(image_id, pad_hw) for image_id in dict.fromkeys(image_ids)}
        slots = []
        for image_id, is_real in zip(image_ids, real):
            if loaded[image_id] is None:
                slots.append((np.zeros((3, *pad_hw), np.float32), PAD_IMAGE_ID, pad_hw, pad_hw))
            else:
                chw, meta = loaded[image_id]
                slots.append((chw, image_id if is_real else PAD_IMAGE_ID, meta.resized_hw,
                              meta.orig_hw))
        images, ids, sizes, orig = zip(*slots)
        return (np.stack(images), np.array(ids, np.int32), np.array(sizes, np.int32),
                np.array(orig, np.int32))

    def _load(self, image_id, pad_hw):
        """-> (chw, ImageMeta), or None for an image that fails to load (flagged)."""
        try:
            image = self.coco.load_image(image_id)
        except DatasetError as err:
            self.failed.mark(image_id, err)
            return None
        return preprocess_image(image, self.geometry, pad_hw, self.pixels)


def plan_eval_batches(members: Sequence[Sequence[int]], batch_size: int, rank: int = 0,
                      group_size: int = 1) -> List[Tuple[int, List[int], List[bool]]]:
    """Evaluation batches of rank ``rank`` -> list of (bucket, [image ids], [is real]).

    Each bucket's last batch is filled up with repeats of its last image; ranks take batches
    round-robin and the shorter shares get whole repeat batches, so every rank runs as many.
    """
    batches = []
    for bucket, ids in enumerate(members):
        for start in range(0, len(ids), batch_size):
            chunk = ids[start:start + batch_size]
            fill = batch_size - len(chunk)
            batches.append((bucket, chunk + [chunk[-1]] * fill,
                            [True] * len(chunk) + [False] * fill))
    share = batches[rank::group_size]
    per_rank = -(-len(batches) // group_size)
    filler = (batches[0][0], batches[0][1], [False] * batch_size)
    return share + [filler] * (per_rank - len(share))


@dataclasses.dataclass
class DataInfo:
    """What a dataset builder found and planned.

    num_images: images with a file, to be run (this rank's); skipped_missing: image files not
    found; buckets: the pad shapes images can go to; pad_shapes: those the batches use, in bucket
    order (one compiled graph each); failed_images: FailedImages, live count and paths of files
    that failed to decode while iterating; label_to_cat_id / class_names: the contiguous labels'
    category ids and names; cleaning: the CocoDataset's annotation statistics.
    """
    num_images: int
    skipped_missing: int
    buckets: list
    pad_shapes: list
    failed_images: "FailedImages"
    label_to_cat_id: list
    class_names: list
    cleaning: dict


@dataclasses.dataclass
class TrainDataInfo(DataInfo):
    """DataInfo of a training set; batches_per_epoch and plan (epoch -> [(bucket, [image ids])])
    are this rank's, the same pad shapes in every epoch; generated_per_epoch: generated samples
    among an epoch's samples (all ranks)."""
    batches_per_epoch: int
    plan: typing.Callable
    generated_per_epoch: int = 0


@dataclasses.dataclass
class EvalDataInfo(DataInfo):
    """DataInfo of an evaluation set; batches: this rank's batch count."""
    batches: int


def _generator_dataset(source, columns, num_parallel_workers, **kwargs):
    return ds.GeneratorDataset(source, column_names=columns,
                               num_parallel_workers=num_parallel_workers,
                               python_multiprocessing=num_parallel_workers > 1, **kwargs)


def _min_sizes(min_size):
    return [int(min_size)] if np.isscalar(min_size) else [int(s) for s in min_size]


def create_train_dataset(img_dir: str, ann_file: str, transform: TrainTransform, *, batch_size: int,
                         pad_buckets: Sequence[Sequence[int]], max_gt_boxes: int, skip_empty_images: bool,
                         num_parallel_workers: int, seed: int, rank: int = 0, group_size: int = 1, shuffle: bool = True,
                         size_divisor: int = 32, start_epoch: int = 0, generated: Optional[GeneratedSamples] = None
                         ) -> Tuple[ds.GeneratorDataset, TrainDataInfo]:
    """Training dataset -> (dataset, info).

    ``transform`` (TrainTransform) augments every sample; its sizes choose the pad buckets.
    Columns: images (B,3,H,W) float32, gt_boxes (B,M,4) float32, gt_labels (B,M) int32,
    gt_mask (B,M) bool, M = max_gt_boxes; (H,W) is one of the pad buckets, or in window mode
    (``transform.window`` > 0: random windows, see window_samples) the one shape window x window
    rounded up to size_divisor. Images whose file is missing are left out up front; one that fails to decode
    is replaced in its batch by another image of its bucket. ``shuffle=False`` keeps a fixed
    batch order (augmentation still changes with the epoch); ``start_epoch`` continues the epoch
    sequence when resuming. In window mode a ``generated`` plug-in (GeneratedSamples) adds its
    samples to every epoch.

    info: TrainDataInfo.
    """
    min_sizes, max_size, window = transform.min_sizes, transform.max_size, transform.window
    coco = CocoDataset(img_dir, ann_file, skip_empty=skip_empty_images)
    present = present_images(coco, coco.image_ids, "training")
    missing = len(coco.image_ids) - len(present)
    # (a window holds part of its image's boxes: no up-front count there)
    too_many = 0 if window else sum(len(coco.targets(i)[0]) > max_gt_boxes for i in present)
    if too_many:
        logger.warning("%d training images have more than max_gt_boxes=%d boxes: the %d largest "
                       "are kept", too_many, max_gt_boxes, max_gt_boxes)
    if window:
        buckets = [window_pad_shape(window, size_divisor)]
        samples = window_samples(coco, present, window)
        samples += generated_samples(len(samples), generated)
        members = [list(range(len(samples)))]
    else:
        if generated is not None:
            raise ValueError("generated samples need window mode (train_window > 0)")
        buckets = resolve_pad_buckets(pad_buckets, min_sizes, max_size, size_divisor)
        samples = [(image_id, 0) for image_id in present]
        index = {image_id: i for i, image_id in enumerate(present)}
        _, grouped = group_by_bucket(coco, present, lambda hw: pad_shape_for(
            hw, max(min_sizes), max_size, buckets, transform.resize_rule), buckets)
        members = [[index[i] for i in ids] for ids in grouped]
    failed = FailedImages(coco, present)
    source = TrainBatches(coco, samples, members, buckets, transform, batch_size=batch_size,
                          max_gt_boxes=max_gt_boxes, seed=seed, rank=rank, group_size=group_size,
                          shuffle=shuffle, failed=failed, generated=generated)
    if source.num_batches == 0:
        raise DatasetError(f"{len(samples)} usable samples make no full batch of {batch_size} per "
                           f"device for {group_size} device(s) in any pad bucket: {ann_file}")
    dataset = _generator_dataset(source, TRAIN_COLUMNS, num_parallel_workers,
                                 sampler=EpochSampler(source.num_batches, start_epoch))
    info = TrainDataInfo(num_images=len(present), skipped_missing=missing, buckets=buckets,
                         pad_shapes=used_pad_shapes(buckets, source.plan(start_epoch)), failed_images=failed,
                         label_to_cat_id=coco.label_to_cat_id, class_names=coco.class_names,
                         cleaning=dict(coco.stats), batches_per_epoch=source.num_batches, plan=source.plan,
                         generated_per_epoch=sum(image_id == GENERATED_ID for image_id, _ in samples))
    return dataset, info


def create_eval_dataset(img_dir: str, ann_file: str, *, batch_size: int, geometry: EvalGeometry,
                        num_parallel_workers: int, rank: int = 0, group_size: int = 1,
                        pixels: PixelFormat = IMAGENET_PIXELS) -> Tuple[ds.GeneratorDataset, EvalDataInfo]:
    """Evaluation dataset -> (dataset, info).

    Every image of the annotation file is kept (with or without boxes), resized and padded as
    ``geometry`` (src.geometry.EvalGeometry) says, normalised as ``pixels`` (PixelFormat). Columns:
    images (B,3,H,W) float32, image_ids (B,) int32 (PAD_IMAGE_ID = -1 marks a
    slot to ignore: a repeat that fills the batch, or an image that failed to load), image_sizes
    (B,2) int32 resized (h, w) before padding, orig_sizes (B,2) int32. Images whose file is
    missing are left out up front, undecodable ones while iterating; both are counted, and the
    images actually run are those whose ids come out (scoring must be restricted to them).

    info: EvalDataInfo (counts of this rank).
    """
    coco = CocoDataset(img_dir, ann_file)
    if not coco.image_ids:
        raise DatasetError(f"no images in annotation file: {ann_file}")
    present = present_images(coco, coco.image_ids, "evaluation")
    if not present:
        raise DatasetError(f"none of the {len(coco.image_ids)} image files of {ann_file} is in "
                           f"{img_dir}")
    buckets, members = group_by_bucket(coco, present, geometry.pad_shape,
                                       None if geometry.per_image else geometry.buckets)
    batches = plan_eval_batches(members, batch_size, rank, group_size)
    failed = FailedImages(coco, present)
    source = EvalBatches(coco, batches, buckets, geometry, pixels, failed)
    dataset = _generator_dataset(source, EVAL_COLUMNS, num_parallel_workers, shuffle=False)
    num_images = sum(sum(real) for _, _, real in batches)
    info = EvalDataInfo(num_images=num_images, skipped_missing=len(coco.image_ids) - len(present), buckets=buckets,
                        pad_shapes=used_pad_shapes(buckets, batches), failed_images=failed,
                        label_to_cat_id=coco.label_to_cat_id, class_names=coco.class_names,
                        cleaning=dict(coco.stats), batches=len(batches))
    return dataset, info
