#!/usr/bin/env python
"""
Write MODEL_ZOO.md from model_zoo/manifest.yaml (as Detectron2's projects generate their
model-zoo tables): one table per dataset, a row per entry and source of numbers. The text comes
from eqlosses_d2/model_zoo/docs.py; ``python -m eqlosses_d2.model_zoo.docs --write`` writes it and
the README's method table in one command.

    python model_zoo/generate_model_zoo_md.py            # (re)write MODEL_ZOO.md
    python model_zoo/generate_model_zoo_md.py --check    # exit 1 if MODEL_ZOO.md is stale
    python model_zoo/generate_model_zoo_md.py --ours-from output/train_methods
        # print the manifest's `ours:` blocks for the quickstart entries from the
        # result.json files of benchmarks/train_methods.py (to paste into the manifest)
"""
import argparse
import glob
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
MANIFEST = os.path.join(HERE, "manifest.yaml")
OUTPUT = os.path.join(ROOT, "MODEL_ZOO.md")


def load_entries(path=MANIFEST):
    sys.path.insert(0, ROOT)
    from eqlosses_d2.model_zoo.manifest import load_manifest

    return load_manifest(path)


def render(entries):
    """MODEL_ZOO.md's text for {name: entry}: :func:`eqlosses_d2.model_zoo.docs.render_model_zoo_md`
    (``python -m eqlosses_d2.model_zoo.docs --write`` writes it and README.md's method table)."""
    sys.path.insert(0, ROOT)
    from eqlosses_d2.model_zoo.docs import render_model_zoo_md

    return render_model_zoo_md(entries)


def ours_blocks(results_dir, entries):
    """The manifest's `ours:` blocks from benchmarks/train_methods.py's result.json files."""
    lines = []
    for path in sorted(glob.glob(os.path.join(results_dir, "*", "*", "result.json"))):
        with open(path) as f:
            result = json.load(f)
        head = os.path.basename(os.path.dirname(os.path.dirname(path)))
        config = os.path.relpath(os.path.join(ROOT, result["config"]), os.path.join(ROOT, "configs"))
        opts = result.get("opts", [])
        if head != "standard":
            if config == "quickstart/mask_rcnn_R18_FPN_synthetic.yaml" and head == "cascade":
                config = "quickstart/cascade_mask_rcnn_R18_FPN_synthetic.yaml"
            else:
                lines.append(f"# {path}: the {head} head with {config} is no model-zoo config: skipped")
                continue
        names = [e.name for e in entries.values() if e.config == config and e.config_package == "eqlosses_d2"]
        if not names:
            lines.append(f"# {path}: no manifest entry has config {config}: skipped")
            continue
        seed = opts[opts.index("SEED") + 1] if "SEED" in opts else "?"
        lines.append(f"  - name: {names[0]}  # {path}")
        lines.append("    ours:")
        lines.append(f"      source: benchmarks/train_methods.py, SEED {seed}")
        lines.append("      data: embedded synthetic data, quickstart schedule")
        for task in ("bbox", "segm"):
            metrics = result["results"][task]
            values = ", ".join(f"{k}: {metrics[k]:.2f}" for k in ("AP", "APr", "APc", "APf"))
            lines.append(f"      {task}: {{{values}}}")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--manifest", default=MANIFEST)
    parser.add_argument("--output", default=OUTPUT)
    parser.add_argument("--check", action="store_true", help="exit 1 if the output file is not up to date")
    parser.add_argument("--ours-from", metavar="DIR", help="print `ours:` blocks from DIR/<head>/<loss>/result.json")
    args = parser.parse_args(argv)
    entries = load_entries(args.manifest)
    if args.ours_from:
        sys.stdout.write(ours_blocks(args.ours_from, entries))
        return 0
    text = render(entries)
    if args.check:
        try:
            with open(args.output, encoding="utf-8") as f:
                current = f.read()
        except FileNotFoundError:
            current = None
        if current != text:
            print(f"{args.output} is stale: run python model_zoo/generate_model_zoo_md.py", file=sys.stderr)
            return 1
        return 0
    with open(args.output, "w", encoding="utf-8") as f:
        f.write(text)
    print(f"wrote {args.output} ({len(entries)} entries)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
