#!/usr/bin/env python
"""
Train and evaluate long-tailed detectors with eqlosses_d2.

    python train_net.py --config-file configs/quickstart/mask_rcnn_R18_FPN_synthetic.yaml
    python train_net.py --config-file CONFIG --eval-only MODEL.WEIGHTS model_final.pth
    python train_net.py --config-file CONFIG --num-gpus 8 [--resume]
    python train_net.py --config-file NAME --eval-only MODEL.WEIGHTS eqlosses_d2://NAME  # model zoo

Multi-machine: ``--num-machines N --machine-rank R --dist-url tcp://HOST:PORT``. Without a
GPU, ``--num-gpus N`` runs N CPU processes joined by gloo.
"""
import logging
import os
import sys

import torch

import eqlosses_d2  # noqa: F401  # compat shims and registration; before other detectron2 imports
import detectron2.utils.comm as comm
from detectron2.config import get_cfg
from detectron2.data import MetadataCatalog
from detectron2.engine import DefaultTrainer, default_argument_parser, default_setup
from detectron2.evaluation import COCOEvaluator, verify_results
from eqlosses_d2 import add_eqlosses_config, find_class_stats, get_class_statistics, model_zoo, prepare_dataset
from eqlosses_d2.checkpoint import AtomicCheckpointer
from eqlosses_d2.compat import TrainerStateMixin, has_detectron2_extension, launch
from eqlosses_d2.config import (
    ConfigError,
    class_stats_dataset,
    merge_config_file,
    merge_config_list,
    validate_eval_protocol,
    validate_num_classes,
)
from eqlosses_d2.data import DatasetError
from eqlosses_d2.evaluation import LVISEvaluator
from eqlosses_d2.evaluation.table import format_ap_table
from eqlosses_d2.modeling.trainable import restrict_trainable
from eqlosses_d2.prefill import MemoryPrefillHook
from eqlosses_d2.resume import RandomStates, build_resumable_train_loader, seek_train_loader

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
                stats = get_class_statistics(name)
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
            stats = get_class_statistics(name)
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
        if evaluator_type == "coco":
            return COCOEvaluator(dataset_name, output_dir=output_folder, use_fast_impl=has_detectron2_extension())
        raise DatasetError(f"dataset '{dataset_name}': no evaluator for evaluator_type={evaluator_type!r}")

    @classmethod
    def build_train_loader(cls, cfg):
        return build_resumable_train_loader(cfg)

    def build_hooks(self):
        # DefaultTrainer created a plain DetectionCheckpointer just before calling us; use
        # one that writes checkpoints atomically, with the same checkpointables plus the
        # RNG states (for an exact --resume).
        self.checkpointer = AtomicCheckpointer(
            self.checkpointer.model, self.cfg.OUTPUT_DIR, rng=RandomStates(), **self.checkpointer.checkpointables
        )
        hooks = super().build_hooks()
        if hasattr(getattr(getattr(self.model, "module", self.model), "roi_heads", None), "memory"):
            hooks.insert(0, MemoryPrefillHook(self.cfg))  # LOCE: fill the feature queues first
        return hooks

    def resume_or_load(self, resume=True):
        super().resume_or_load(resume=resume)
        if self.start_iter > 0:
            # continue the sample stream where the interrupted run stopped
            per_rank_batch = self.cfg.SOLVER.IMS_PER_BATCH // comm.get_world_size()
            if not seek_train_loader(self._trainer, self.start_iter, per_rank_batch):
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
            print("\n" + format_ap_table(results, name), flush=True)
        return results


def setup_cfg(args):
    """The frozen config of a run: defaults, package keys, file, command line; checked."""
    cfg = get_cfg()
    add_eqlosses_config(cfg)
    merge_config_file(cfg, args.config_file)
    merge_config_list(cfg, args.opts)
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        logger.warning("MODEL.DEVICE=%s but no CUDA device is available: using cpu", cfg.MODEL.DEVICE)
        cfg.MODEL.DEVICE = "cpu"
    validate_eval_protocol(cfg)
    eqlosses_d2.config.validate_one_stage(cfg)  # MODEL.EQLOSSES.ONE_STAGE (one-stage detectors)
    eqlosses_d2.config.validate_copy_paste(cfg)  # INPUT.EQLOSSES.* (copy-paste mapper)
    cfg.freeze()
    return cfg


def prepare_datasets(cfg, eval_only=False):
    """Generate/check every dataset the run uses and validate NUM_CLASSES against them."""
    names = ([] if eval_only else list(cfg.DATASETS.TRAIN)) + list(cfg.DATASETS.TEST)
    for name in names:
        prepare_dataset(name)
    validate_num_classes(cfg, names)


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
        AtomicCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
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
    """Fail in the launching process, in one line, before any worker starts."""
    cfg = setup_cfg(args)
    weights = cfg.MODEL.WEIGHTS
    if args.eval_only:
        if not weights:
            raise ConfigError("--eval-only needs MODEL.WEIGHTS")
        if "://" not in weights and not os.path.isfile(weights):
            hint = f"; the model zoo's is {model_zoo.PREFIX}{weights}" if model_zoo.is_model_zoo_name(weights) else ""
            raise ConfigError(f"MODEL.WEIGHTS: checkpoint not found: {weights}{hint}")
    if weights.startswith(model_zoo.PREFIX) and (args.eval_only or not args.resume):
        model_zoo.get_checkpoint_path(weights)  # download and verify once, before any worker starts
    # generate the synthetic data once here, not in every worker at the same time
    prepare_datasets(cfg, eval_only=args.eval_only)


def cli(argv=None):
    args = default_argument_parser().parse_args(argv)
    try:
        check_args(args)
    except (ConfigError, DatasetError, FileNotFoundError, model_zoo.ModelZooError) as e:
        print(f"train_net.py: error: {e}", file=sys.stderr)
        return 2
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )
    return 0


if __name__ == "__main__":
    sys.exit(cli())
