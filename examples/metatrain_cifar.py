"""Meta-train the `cifar` learned optimizer recipe, resumably, then export it.

The ``cifar`` config is the recipe of the bundled CIFAR-10 optimizer: merged PES on
validation loss over small ConvNets at 8x8 and 16x16. It runs for hours on 2 CPU cores; stop it
at any moment and run the same command again to resume::

  python examples/metatrain_cifar.py --workdir runs/cifar --data-dir ../shared/data/cifar10
"""

import argparse
import pathlib

from metatrain import configs, trainer


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", default="runs/cifar", help="meta-training directory")
  parser.add_argument("--steps", type=int, default=None, help="meta-steps (default: recipe's)")
  parser.add_argument("--data-dir", default=None,
                      help="directory with cifar10_train.npz (default $OPTAX_LEARNED_DATA, "
                           "else TFDS)")
  parser.add_argument("--out", default=None, help="export the weights here when done")
  args = parser.parse_args()
  workdir = pathlib.Path(args.workdir)
  trainer.MetaTrainer(configs.get_config("cifar"), workdir, data_dir=args.data_dir).train(
      args.steps)
  if args.out:
    print(f"exported to {trainer.export(workdir, args.out, overwrite=True)}")


if __name__ == "__main__":
  main()
