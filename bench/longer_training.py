"""Issue 19, claim 3: more training from a fly_neuromechfly model, on the recipe's renders, two ways.

    OMP_NUM_THREADS=1 python bench/longer_training.py renders-alone RUN --renders WORK/renders_<key>.npz [--init MODEL] [--steps 4800] [--lr 3e-4]
    OMP_NUM_THREADS=1 python bench/longer_training.py third-round RUN --renders WORK/renders_<key>.npz [--init MODEL] [--steps 4800] [--lr 3e-4] [--pseudo-repeat 1]

`renders-alone` trains `--steps` more steps on the renders alone (what the recipe's `polish_steps` does after its rounds);
`third-round` runs one more self-training round on ../shared/data/deeperfly_example (`self_training.self_train`, rounds=1),
the renders beside the round's pseudo-labels counted `--pseudo-repeat` times. Both start from `--init` (default
bundled:fly_neuromechfly; the 2026-12-05 runs started from the two-round model shipped then, which its recipe's second
command writes as /tmp/mj_post96/self_train_2/last.pt: their third round is the shipped model since), with the recipe's round settings at peak learning rate `--lr`, half the crops given the example's look (64 frames per
pathway). `--renders` is the renders file a recipe work folder keeps (`python -m deeperfly_nb.neuromechfly_model ...`
with the default settings writes WORK/renders_dbe443bfe029.npz). The model is RUN/last.pt or RUN/round_1/train/model.pt;
score it with `bench_held_out.py --model PATH`. 4,800 steps: about 64 min on one thread. Results of 2026-12-05:
bench/results/held_out_longer_training.json.
"""
from __future__ import annotations
import argparse, sys, time
from pathlib import Path

EXAMPLE = (Path(__file__).resolve().parents[2] / "shared" / "data" / "deeperfly_example").resolve()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("how", choices=["renders-alone", "third-round"])
    ap.add_argument("run", help="the run folder (resumable)")
    ap.add_argument("--renders", required=True, help="a recipe work folder's renders_<key>.npz")
    ap.add_argument("--steps", type=int, default=4800)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--init", default="bundled:fly_neuromechfly", help="the model to start from: bundled:NAME or a .pt path")
    ap.add_argument("--pseudo-repeat", type=int, default=1, help="third-round: the pseudo-labels count this many times beside the renders")
    args = ap.parse_args(argv)
    if not EXAMPLE.is_dir(): print(f"{EXAMPLE} is missing: no unlabelled footage for the crops' look and the round", file=sys.stderr); return 1
    import torch; torch.set_num_threads(1)
    from deeperfly_nb.config import Config
    from deeperfly_nb.labels import footage_inputs, load_samples
    from deeperfly_nb.neuromechfly_model import NeuroMechFlyRecipe, round_train_settings
    from deeperfly_nb.self_training import SelfTrainOptions, self_train
    from deeperfly_nb.training import train_detector, with_trained_model
    renders, run = load_samples(args.renders), Path(args.run)
    style = footage_inputs(EXAMPLE, Config.default().detection_plan(), n_frames=64)
    settings = {**round_train_settings(NeuroMechFlyRecipe()), "steps": args.steps, "lr": args.lr, "eval_every": args.steps}
    t0 = time.perf_counter()
    if args.how == "renders-alone":
        train_detector(renders, run, {**settings, "init": args.init}, resume=(run / "last.pt").exists(), progress=False, style_images=style)
        model = run / "last.pt"
    else:
        opts = SelfTrainOptions(rounds=1, threshold_px=20.0, pseudo_repeat=args.pseudo_repeat, train=settings)
        res = self_train([EXAMPLE], run, with_trained_model(Config.default(), args.init), opts, renders, False, style)
        model = res.model_path
        print("the round on deeperfly_example:", res.rounds[-1]["recordings"], "then the last model:", res.final, flush=True)
    print(f"trained {args.steps} steps in {time.perf_counter() - t0:.0f} s: {model}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
