"""Meta-train a learned optimizer on the digits MLP in minutes on CPU, then compare it to Adam.

Runs the ``digits`` recipe (PES on validation loss) into ``--workdir`` (resumable: run it again
to continue), exports the weights, and evaluates them against Adam, SGD with momentum and
RMSProp, each tuned over a learning-rate grid::

  python examples/metatrain_digits.py --workdir runs/digits --steps 1500
"""

import argparse
import pathlib

from metatrain import configs, evaluation, trainer


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", default="runs/digits", help="meta-training directory")
  parser.add_argument("--steps", type=int, default=None, help="meta-steps (default: recipe's)")
  parser.add_argument("--eval-steps", type=int, default=1000, help="evaluation training steps")
  args = parser.parse_args()
  workdir = pathlib.Path(args.workdir)
  trainer.MetaTrainer(configs.get_config("digits"), workdir).train(args.steps)
  exported = trainer.export(workdir, workdir / "exported", overwrite=True)
  results = evaluation.evaluate(str(exported), "digits_mlp", steps=args.eval_steps, seeds=3,
                                out_dir=workdir / "evaluation")
  print(evaluation.markdown(results))


if __name__ == "__main__":
  main()
