"""
The model zoo from the command line:

    python -m eqlosses_d2.model_zoo list            # names, with what each has
    python -m eqlosses_d2.model_zoo config NAME     # the config file of NAME
    python -m eqlosses_d2.model_zoo fetch NAME      # download and verify; print the cached path
    python -m eqlosses_d2.model_zoo path NAME       # the same (an alias)
"""
import argparse
import logging
import sys

from . import ModelZooError, cache_dir, get_checkpoint_path, get_config_file, load_manifest


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m eqlosses_d2.model_zoo", description="The eqlosses_d2 model zoo.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list the model-zoo names")
    for command in ("config", "fetch", "path"):
        p = sub.add_parser(command)
        p.add_argument("name")
        if command != "config":
            p.add_argument("--force", action="store_true", help="fetch again even if a verified copy is cached")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.command == "list":
            for name, entry in load_manifest().items():
                if entry.weights is None:
                    weights = "config only"
                else:
                    weights = f"checkpoint ({entry.weights.checksum.kind})"
                print(f"{name}\t{weights}")
            print(f"# cache: {cache_dir()}", file=sys.stderr)
        elif args.command == "config":
            print(get_config_file(args.name))
        else:
            print(get_checkpoint_path(args.name, force=args.force))
    except ModelZooError as e:
        print(f"eqlosses_d2.model_zoo: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
