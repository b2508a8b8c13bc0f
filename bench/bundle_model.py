"""Issue 19: a model trained by the bench's recipe, written into the package as a bundled model, its provenance in its metadata.

    python bench/bundle_model.py RUN/self_train_2/model.pt --name fly_neuromechfly --recipe "CMD" [--recipe "CMD" ...] \
        --description "..." --out deeperfly_nb/models/fly_neuromechfly.pt

Reads the trained checkpoint, keeps its weights and training metadata, adds `name`, `description` and `recipe` (the
commands that made it, in order), and writes it with `training.write_bundled_model` (atomically; the same layout as the
bundled `fly_synthetic`). Refuses a file over 10 MB. Its scores are `bench_held_out.py`'s, run on the written file. The model is then `weights = "bundled:<name>"` in a config, or `deeperfly run RECORDING --model bundled:<name>`.
"""
from __future__ import annotations
import argparse, sys


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="the trained model (a run's model.pt)")
    ap.add_argument("--name", required=True, help="the bundled model's name: letters, digits, _ and -")
    ap.add_argument("--description", required=True, help="what it is, in a sentence or two")
    ap.add_argument("--recipe", action="append", required=True, metavar="CMD", help="a command of the recipe, in order (repeatable)")
    ap.add_argument("--out", required=True, help="where to write it, e.g. deeperfly_nb/models/NAME.pt")
    args = ap.parse_args(argv)
    from deeperfly_nb.core import ModelError
    from deeperfly_nb.training import write_bundled_model
    try: out = write_bundled_model(args.model, args.out, args.name, args.description, recipe=list(args.recipe), created_by="bench/bundle_model.py")
    except ModelError as e: sys.exit(f"bundle_model.py: {e}")
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB): weights = \"bundled:{args.name}\"")
    return 0


if __name__ == "__main__": sys.exit(main())
