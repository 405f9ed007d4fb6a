"""How few steps does Adam need with a schedule tuned for the horizon?

The ``cifar`` wall-clock target compares the learned optimizer with Adam at a constant, tuned
learning rate: steps (and seconds) to reach that Adam's training loss after ``--steps`` steps.
A learned optimizer can learn a schedule; this benchmark asks how much of a speed-up a
schedule alone buys. For each shorter budget ``n`` and each peak learning rate it trains Adam
with a linear warm-up and a cosine decay to zero over exactly ``n`` steps, on the evaluation
protocol of ``benchmarks.eval_cifar`` (evaluation seeds 10000+, validation on the holdout
rows), and prints the final losses and the step at which the mean training loss reaches the
target. The last line is the smallest budget that reached it, as a ratio of ``--steps``.

Usage::

  export OPTAX_LEARNED_DATA=/path/to/cifar10
  python -m benchmarks.scheduled_adam                       # cifar_conv_32, budgets 500..800
  python -m benchmarks.scheduled_adam --budgets 20 --peaks 1e-2 --steps 40 --seeds 1  # smoke
"""

import argparse
import logging
import sys

import optax

from benchmarks.eval_cifar import comma_separated
from metatrain import evaluation, tasks


def warmup_cosine_adam(peak: float, budget: int) -> optax.GradientTransformation:
  """Adam whose learning rate rises linearly to ``peak`` over ``budget // 10`` steps (at most
  50), then decays to zero by step ``budget`` along a cosine."""
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak, warmup_steps=max(1, min(50, budget // 10)),
      decay_steps=budget, end_value=0.0)
  return optax.adam(schedule)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--task", default="cifar_conv_32")
  parser.add_argument("--steps", type=int, default=1000,
                      help="the constant-rate Adam run whose final training loss is the target")
  parser.add_argument("--learning_rate", type=float, default=3.16e-3,
                      help="its learning rate (the tuned one of the evaluation protocol)")
  parser.add_argument("--budgets", type=comma_separated(int), default=(500, 600, 700, 800),
                      help="comma-separated schedule lengths")
  parser.add_argument("--peaks", type=comma_separated(float), default=(5.62e-3, 1e-2, 1.78e-2),
                      help="comma-separated peak learning rates")
  parser.add_argument("--seeds", type=int, default=3)
  parser.add_argument("--holdout_size", type=int, default=5000)
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.WARNING)

  task = tasks.get_task(args.task, conv_impl="lax", holdout_size=args.holdout_size,
                        validate_on="holdout")
  data = task.load_data()
  constant = evaluation.train_baseline("adam", args.learning_rate, task, steps=args.steps,
                                       seeds=args.seeds, data=data)
  target = constant["mean"]["train_loss"][-1]
  print(f"constant adam {args.learning_rate:g}, {args.steps} steps: train {target:.4f} "
        f"valid {constant['mean']['valid_loss'][-1]:.4f}", flush=True)

  fastest = None
  for budget in sorted(args.budgets):
    for peak in args.peaks:
      run = evaluation.evaluate_transformation(
          warmup_cosine_adam(peak, budget), task, steps=budget, seeds=args.seeds, data=data,
          eval_every=max(1, budget // 20))
      mean = run["mean"]
      step, _ = evaluation.time_to_target(run["steps"], mean["seconds"], mean["train_loss"],
                                          target)
      reached = "-" if step is None else f"{step:.0f}"
      print(f"budget {budget} peak {peak:g}: train {mean['train_loss'][-1]:.4f} "
            f"valid {mean['valid_loss'][-1]:.4f} steps to target {reached}", flush=True)
      if step is not None and fastest is None:
        fastest = (budget, peak, step)
  if fastest is None:
    print(f"no schedule reached {target:.4f} within {max(args.budgets)} steps "
          f"({max(args.budgets) / args.steps:.2f}x)")
  else:
    budget, peak, step = fastest
    print(f"shortest budget reaching the target: {budget} steps (peak {peak:g}, reached at "
          f"step {step:.0f}), {budget / args.steps:.2f}x constant Adam's steps")
  return 0


if __name__ == "__main__":
  sys.exit(main())
