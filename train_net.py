#!/usr/bin/env python
"""
Train and evaluate long-tailed detectors, image classifiers and semantic segmenters with eqlosses_d2.

    python train_net.py --config-file configs/quickstart/mask_rcnn_R18_FPN_synthetic.yaml
    python train_net.py --config-file configs/quickstart/softmax_sem_seg_synthetic.yaml  # semantic segmentation
    python train_net.py --config-file CONFIG --eval-only MODEL.WEIGHTS model_final.pth
    python train_net.py --config-file CONFIG --num-gpus 8 [--resume]
    python train_net.py --config-file NAME --eval-only MODEL.WEIGHTS eqlosses_d2://NAME  # model zoo

Multi-machine: ``--num-machines N --machine-rank R --dist-url tcp://HOST:PORT``. Without a
GPU, ``--num-gpus N`` runs N CPU processes joined by gloo.
"""
import logging
import os
import sys
import tempfile

import torch

import eqlosses_d2  # noqa: F401  # compat shims and registration; before other detectron2 imports
import detectron2.utils.comm as comm
from detectron2.config import get_cfg
from detectron2.data import MetadataCatalog
from detectron2.engine import DefaultTrainer, default_argument_parser, default_setup
from detectron2.engine import hooks as d2_hooks
from detectron2.evaluation import COCOEvaluator, verify_results
from eqlosses_d2 import add_eqlosses_config, find_class_stats, get_class_statistics, model_zoo, prepare_dataset
from eqlosses_d2.classification import ClassificationEvaluator, format_accuracy_table, is_classification
from eqlosses_d2.classification.difficulty import build_classification_hooks
from eqlosses_d2.classification.decoupling import missing_weights_hint
from eqlosses_d2.classification.data import (
    build_classification_test_loader,
    build_classification_train_loader,
    prepare_classification_dataset,
)
from eqlosses_d2.checkpoint import (
    AtomicCheckpointer,
    CheckpointError,
    check_checkpoint_file,
    check_predictors_loaded,
    tagged_checkpoint,
)
from eqlosses_d2.compat import TrainerStateMixin, has_detectron2_extension, launch
from eqlosses_d2.config import (
    ConfigError,
    class_stats_dataset,
    merge_config_file,
    merge_config_list,
    validate_num_classes,
)
from eqlosses_d2.data import DatasetError
from eqlosses_d2.data.cdb_sampler import ClassDifficultySamplingHook, start_class_difficulty_sampling
from eqlosses_d2.evaluation import LVISEvaluator
from eqlosses_d2.evaluation.table import format_ap_table
from eqlosses_d2.modeling.trainable import restrict_trainable
from eqlosses_d2.segmentation import is_semantic_segmentation
from eqlosses_d2.segmentation.data import get_sem_seg_class_statistics, prepare_sem_seg_dataset, training_split_of
from eqlosses_d2.segmentation.evaluator import LongTailSemSegEvaluator, format_sem_seg_table
from eqlosses_d2.segmentation.training import POLY_LR_SCHEDULER, build_poly_lr_scheduler, build_sem_seg_train_loader
from eqlosses_d2.prefill import MemoryPrefillHook
from eqlosses_d2.resume import RankStates, ResumeError, build_resumable_train_loader, seek_train_loader

logger = logging.getLogger("eqlosses_d2")


class Trainer(TrainerStateMixin, DefaultTrainer):
    @classmethod
    def build_model(cls, cfg, with_class_stats=True):
        """
        The model, with the training set's per-class statistics in its buffers. For
        ``--eval-only`` (``with_class_stats=False``) they come from the checkpoint instead.
        """
        model = super().build_model(cfg)
        stats_module = find_class_stats(model)
        if with_class_stats and stats_module is not None:
            name = class_stats_dataset(cfg)
            try:
                stats = class_statistics(cfg, name)
            except (DatasetError, FileNotFoundError, ValueError) as e:
                if cfg.MODEL.EQLOSSES.REQUIRE_CLASS_STATS:
                    raise DatasetError(f"MODEL.EQLOSSES.CLASS_STATS_DATASET: {e}") from None
                logger.warning("Training without per-class statistics: %s", e)
            else:
                stats_module.set_from(stats, name)
        trainable = cfg.MODEL.EQLOSSES.TRAINABLE_MODULES
        if trainable:
            count = restrict_trainable(model, trainable)
            logger.info("MODEL.EQLOSSES.TRAINABLE_MODULES: %d trainable parameters (%s)", count, ", ".join(trainable))
        return model

    @classmethod
    def fill_missing_class_stats(cls, cfg, model):
        """
        A checkpoint trained elsewhere (e.g. Detectron2's own LVIS models) has no class
        statistics; calibration needs them: take them from the class-statistics dataset.
        """
        stats_module = find_class_stats(model)
        if stats_module is None or bool(stats_module.is_set):
            return
        name = class_stats_dataset(cfg)
        try:
            stats = class_statistics(cfg, name)
        except (DatasetError, FileNotFoundError, ValueError) as e:
            raise DatasetError(
                f"MODEL.WEIGHTS has no class statistics and MODEL.EQLOSSES.CLASS_STATS_DATASET '{name}' "
                f"gives none: {e}"
            ) from None
        stats_module.set_from(stats, name)
        logger.info("Class statistics for calibration taken from '%s' (the checkpoint has none)", name)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        if output_folder is None:
            output_folder = os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        evaluator_type = MetadataCatalog.get(dataset_name).get("evaluator_type")
        if evaluator_type == "lvis":
            if cfg.TEST.EQLOSSES.PROTOCOL == "fixed":
                return LVISEvaluator(
                    dataset_name,
                    output_dir=output_folder,
                    max_dets_per_image=-1,
                    max_dets_per_category=cfg.TEST.EQLOSSES.FIXED_AP_DETS_PER_CLASS,
                    pooled=cfg.TEST.EQLOSSES.POOLED_AP,
                )
            return LVISEvaluator(
                dataset_name,
                output_dir=output_folder,
                max_dets_per_image=cfg.TEST.DETECTIONS_PER_IMAGE,
                pooled=cfg.TEST.EQLOSSES.POOLED_AP,
                boundary=cfg.TEST.EQLOSSES.PROTOCOL == "boundary",
            )
        if evaluator_type == "classification":
            return ClassificationEvaluator(dataset_name, output_dir=output_folder)
        if evaluator_type == "sem_seg":
            # frequency groups: the dataset's training split's counts, with the config's thresholds
            stats = class_statistics(cfg, training_split_of(dataset_name))
            return LongTailSemSegEvaluator(dataset_name, output_dir=output_folder, class_statistics=stats)
        if evaluator_type == "coco":
            return COCOEvaluator(dataset_name, output_dir=output_folder, use_fast_impl=has_detectron2_extension())
        raise DatasetError(f"dataset '{dataset_name}': no evaluator for evaluator_type={evaluator_type!r}")

    @classmethod
    def build_train_loader(cls, cfg):
        if is_classification(cfg):
            return build_classification_train_loader(cfg)
        if is_semantic_segmentation(cfg):
            return build_sem_seg_train_loader(cfg)
        return build_resumable_train_loader(cfg)

    @classmethod
    def build_lr_scheduler(cls, cfg, optimizer):
        if cfg.SOLVER.LR_SCHEDULER_NAME == POLY_LR_SCHEDULER:
            return build_poly_lr_scheduler(cfg, optimizer)
        return super().build_lr_scheduler(cfg, optimizer)

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        if is_classification(cfg):
            return build_classification_test_loader(cfg, dataset_name)
        return super().build_test_loader(cfg, dataset_name)

    def build_hooks(self):
        # DefaultTrainer created a plain DetectionCheckpointer just before calling us; use
        # one that writes checkpoints atomically, with the same checkpointables plus each
        # rank's own states (RNGs, sample position, BatchNorm statistics, LOCE's queues)
        # for an exact --resume.
        rank_states = RankStates(self.checkpointer.model, self._per_rank_batch(), seed=self.cfg.SEED)
        self.checkpointer = AtomicCheckpointer(
            self.checkpointer.model, self.cfg.OUTPUT_DIR, rank_states=rank_states, **self.checkpointer.checkpointables
        )
        if comm.is_main_process():
            # start-up, before any rank can save: writes killed before their rename left these
            self.checkpointer.remove_stale_temporaries()
        hooks = super().build_hooks()
        if not comm.is_main_process():
            # Detectron2 checkpoints from rank 0 only; each save is now collective (every
            # rank writes its own state), so every rank runs the checkpoint hook, at the
            # place rank 0 has it: before evaluation.
            evals = [i for i, h in enumerate(hooks) if isinstance(h, d2_hooks.EvalHook)]
            hooks.insert(
                evals[0] if evals else len(hooks),
                d2_hooks.PeriodicCheckpointer(self.checkpointer, self.cfg.SOLVER.CHECKPOINT_PERIOD),
            )
        if hasattr(getattr(getattr(self.model, "module", self.model), "roi_heads", None), "memory"):
            hooks.insert(0, MemoryPrefillHook(self.cfg))  # LOCE: fill the feature queues first
        # what the classification loss needs (CDB-W: class accuracies every CDB.UPDATE_PERIOD), after the
        # iteration timer and before the checkpointer, which then saves the new state
        hooks[1:1] = build_classification_hooks(self.cfg)
        # CDB-S: each closed difficulty window's class weights to the sampler in the loader's workers
        hooks[1:1] = ClassDifficultySamplingHook.build(self.model, self._trainer.data_loader)
        return hooks

    def _complete_final_checkpoint(self):
        """
        A resumed run with nothing left to train. Detectron2 writes ``model_final.pth`` only
        from a step, right after the last periodic checkpoint (the same state): a run killed
        between the two would never get one. Write it now, from the checkpoint just loaded,
        as the interrupted run would have (collective: each rank's state, restored exactly
        and not advanced since, goes into ``model_final.pth`` or beside it as
        ``model_final.pth.rank<r>``, so the final checkpoint resumes like any other).
        """
        final = os.path.join(self.cfg.OUTPUT_DIR, "model_final.pth")
        loaded = self.checkpointer.get_checkpoint_file() if self.checkpointer.has_checkpoint() else None
        missing = not os.path.isfile(final)
        if comm.get_world_size() > 1:
            missing = comm.all_gather(missing)[0]  # rank 0 decides, every rank saves
        if missing and loaded:
            self.checkpointer.save("model_final", iteration=self.start_iter - 1)
            logger.info(
                "Training is complete (iteration %d of SOLVER.MAX_ITER %d): wrote %s from %s",
                self.start_iter, self.max_iter, final, os.path.basename(loaded),
            )
        else:
            logger.info(
                "Training is complete (iteration %d of SOLVER.MAX_ITER %d): the final weights are %s",
                self.start_iter, self.max_iter, final if not missing else loaded,
            )

    def _per_rank_batch(self):
        return self.cfg.SOLVER.IMS_PER_BATCH // comm.get_world_size()

    def resume_or_load(self, resume=True):
        super().resume_or_load(resume=resume)
        if resume and self.start_iter >= self.max_iter:
            self._complete_final_checkpoint()
            return
        # CDB-S: the loaded class weights to its sampler, before the loader draws from them
        start_class_difficulty_sampling(self.model, self._trainer.data_loader, self.start_iter)
        if self.start_iter > 0:
            # continue this rank's sample stream where the interrupted run stopped (after a
            # world-size change, at the same global position)
            position = self.checkpointer.rank_states.sample_position
            if position is None:
                position = self.start_iter * self._per_rank_batch()
            if not seek_train_loader(self._trainer, position):
                logger.warning("The train loader is not resumable: the sample stream restarts")

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        if evaluators is None and cfg.TEST.EQLOSSES.PROTOCOL == "fixed":
            # Fixed AP: the evaluator tells the RoI heads which detections can no longer
            # enter a class's top K, so the mask head skips them
            evaluators = [cls.build_evaluator(cfg, name) for name in cfg.DATASETS.TEST]
            roi_heads = getattr(getattr(model, "module", model), "roi_heads", None)
            for evaluator in evaluators:
                if isinstance(evaluator, LVISEvaluator) and hasattr(roi_heads, "test_score_floor"):
                    evaluator.score_floor_consumers.append(roi_heads)
        results = super().test(cfg, model, evaluators)
        if comm.is_main_process() and cfg.TEST.EQLOSSES.PRINT_TABLE and results:
            name = cfg.DATASETS.TEST[0] if len(cfg.DATASETS.TEST) == 1 else None
            table = format_accuracy_table if is_classification(cfg) else format_ap_table
            table = format_sem_seg_table if is_semantic_segmentation(cfg) else table
            print("\n" + table(results, name), flush=True)
        return results


def class_statistics(cfg, name):
    """The per-class statistics of dataset ``name`` that a model trained with ``cfg`` stores."""
    if is_semantic_segmentation(cfg):
        node = cfg.MODEL.EQLOSSES.SEM_SEG
        return get_sem_seg_class_statistics(name).with_thresholds(node.RARE_MAX_IMAGES, node.COMMON_MAX_IMAGES)
    return get_class_statistics(name)


def setup_cfg(args):
    """The frozen config of a run: defaults, package keys, file, command line; checked."""
    cfg = get_cfg()
    add_eqlosses_config(cfg)
    merge_config_file(cfg, args.config_file)
    merge_config_list(cfg, args.opts)
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        logger.warning("MODEL.DEVICE=%s but no CUDA device is available: using cpu", cfg.MODEL.DEVICE)
        cfg.MODEL.DEVICE = "cpu"
    # every registered config check: registry names, the methods' values, evaluation, one-stage, copy-paste
    eqlosses_d2.config.validate_config(cfg)
    cfg.freeze()
    return cfg


def prepare_datasets(cfg, eval_only=False):
    """Generate/check every dataset the run uses (their annotation files included) and
    validate NUM_CLASSES against them; refuse a split with nothing to train or evaluate on."""
    train = [] if eval_only else list(cfg.DATASETS.TRAIN)
    names = train + list(cfg.DATASETS.TEST)
    if is_classification(cfg):
        return prepare_classification_datasets(cfg, names)
    if is_semantic_segmentation(cfg):
        return prepare_sem_seg_datasets(cfg, names)
    for name in names:
        meta = prepare_dataset(name)
        stats = meta.get("class_statistics")
        if stats is None:
            continue
        if stats.num_images == 0:
            raise DatasetError(f"dataset '{name}': {meta.json_file} has no images: nothing to train on or evaluate")
        if name in train and stats.num_images_with_annotations == 0 and cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS:
            raise DatasetError(
                f"dataset '{name}': {meta.json_file} has no image with an annotation to train on "
                f"(DATALOADER.FILTER_EMPTY_ANNOTATIONS drops the others)"
            )
    validate_num_classes(cfg, names)


def prepare_classification_datasets(cfg, names):
    """The image classifier's datasets: generated / converted, checked, their class count equal
    to MODEL.EQLOSSES.CLASSIFICATION.NUM_CLASSES."""
    num_classes = cfg.MODEL.EQLOSSES.CLASSIFICATION.NUM_CLASSES
    for name in names:
        stats = prepare_classification_dataset(name).class_statistics
        if stats.num_images == 0:
            raise DatasetError(f"dataset '{name}': no images: nothing to train on or evaluate")
        if stats.num_classes != num_classes:
            raise ConfigError(
                f"MODEL.EQLOSSES.CLASSIFICATION.NUM_CLASSES={num_classes} does not match dataset '{name}', "
                f"which has {stats.num_classes} classes"
            )


def prepare_sem_seg_datasets(cfg, names):
    """The semantic segmenter's datasets: generated, checked, their class count equal to
    MODEL.SEM_SEG_HEAD.NUM_CLASSES and their ignore label to IGNORE_VALUE."""
    head = cfg.MODEL.SEM_SEG_HEAD
    for name in names:
        meta = prepare_sem_seg_dataset(name)
        if len(meta.stuff_classes) != head.NUM_CLASSES:
            raise ConfigError(
                f"MODEL.SEM_SEG_HEAD.NUM_CLASSES={head.NUM_CLASSES} does not match dataset '{name}', "
                f"which has {len(meta.stuff_classes)} classes"
            )
        if meta.get("ignore_label", head.IGNORE_VALUE) != head.IGNORE_VALUE:
            raise ConfigError(
                f"MODEL.SEM_SEG_HEAD.IGNORE_VALUE={head.IGNORE_VALUE} does not match dataset '{name}', "
                f"whose ignore label is {meta.ignore_label}"
            )


def setup(args):
    cfg = setup_cfg(args)
    if args.config_file and not os.path.isfile(args.config_file):  # a model-zoo name: log its file
        args = type(args)(**{**vars(args), "config_file": model_zoo.get_config_file(args.config_file)})
    default_setup(cfg, args)
    prepare_datasets(cfg, eval_only=args.eval_only)
    return cfg


def main(args):
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg, with_class_stats=False)
        checkpointer = AtomicCheckpointer(model, save_dir=cfg.OUTPUT_DIR)
        checkpointer.resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        # weights that leave a predictor random would score a partly random model
        resumed = args.resume and checkpointer.has_checkpoint()
        loaded = checkpointer.get_checkpoint_file() if resumed else cfg.MODEL.WEIGHTS
        check_predictors_loaded(model, checkpointer.incompatible, loaded)
        if cfg.TEST.EQLOSSES.CALIBRATION.METHOD != "none":
            Trainer.fill_missing_class_stats(cfg, model)
        results = Trainer.test(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, results)
        return results
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    trainer.train()
    # DefaultTrainer.train() returns them only with TEST.EXPECTED_RESULTS set
    return getattr(trainer, "_last_eval_results", None)


def check_args(args):
    """Fail in the launching process, in one line, before any worker starts and before
    anything is written to OUTPUT_DIR."""
    cfg = setup_cfg(args)
    weights = cfg.MODEL.WEIGHTS
    # --resume loads what OUTPUT_DIR/last_checkpoint names (MODEL.WEIGHTS then goes unused)
    resumed = tagged_checkpoint(cfg.OUTPUT_DIR) if args.resume else None
    if resumed is None:
        if args.eval_only and not weights:
            raise ConfigError("--eval-only needs MODEL.WEIGHTS")
        if weights and "://" not in weights and not os.path.isfile(weights):
            hint = f"; the model zoo's is {model_zoo.PREFIX}{weights}" if model_zoo.is_model_zoo_name(weights) else ""
            hint = hint or missing_weights_hint(cfg)  # a stage-2 config: the command that writes its stage-1 model
            raise ConfigError(f"MODEL.WEIGHTS: checkpoint not found: {weights}{hint}")
        if weights:
            check_checkpoint_file(weights, "MODEL.WEIGHTS")  # truncated, or not a checkpoint
        if weights.startswith(model_zoo.PREFIX):
            model_zoo.get_checkpoint_path(weights)  # download and verify once, before any worker starts
    # generate the synthetic data once here, not in every worker at the same time
    prepare_datasets(cfg, eval_only=args.eval_only)


#: errors of the input (config, data, checkpoints, --resume) that the command line reports in one line
USER_ERRORS = (ConfigError, DatasetError, CheckpointError, ResumeError)


def _error_line(e):
    return f"train_net.py: error: {e}"


def _error_marker(launcher_pid):
    return os.path.join(tempfile.gettempdir(), f"train_net-{launcher_pid}.error")


def worker(args):
    """``main`` in a launched process. One of several stops on an input error with exit
    status 2, the first on its machine after printing the error's one line (the ranks meet
    the same errors; the launcher then reports exit status 2, no traceback); a single
    process raises it to :func:`cli`."""
    try:
        return main(args)
    except USER_ERRORS as e:
        if comm.get_world_size() <= 1:
            raise
        try:  # the first failing rank of this launch prints
            os.close(os.open(_error_marker(os.getppid()), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            pass
        except OSError:  # no writable temporary directory: every rank prints
            print(_error_line(e), file=sys.stderr, flush=True)
        else:
            print(_error_line(e), file=sys.stderr, flush=True)
        sys.exit(2)


def cli(argv=None):
    args = default_argument_parser().parse_args(argv)
    try:
        check_args(args)
    except USER_ERRORS + (FileNotFoundError, model_zoo.ModelZooError) as e:
        print(_error_line(e), file=sys.stderr)
        return 2
    marker = _error_marker(os.getpid())
    try:
        if os.path.exists(marker):  # left by a killed launcher of the same pid
            os.remove(marker)
        launch(
            worker,
            args.num_gpus,
            num_machines=args.num_machines,
            machine_rank=args.machine_rank,
            dist_url=args.dist_url,
            args=(args,),
        )
    except USER_ERRORS as e:  # one process
        print(_error_line(e), file=sys.stderr)
        return 2
    except torch.multiprocessing.ProcessExitedException as e:
        if e.exit_code == 2:  # a worker printed its input error
            return 2
        raise
    finally:
        if os.path.exists(marker):
            os.remove(marker)
    return 0


if __name__ == "__main__":
    sys.exit(cli())
