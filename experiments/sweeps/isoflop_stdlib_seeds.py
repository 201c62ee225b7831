"""The CPU isoFLOP sweep of isoflop_stdlib.py with three seeds per model (84 runs, about 4 hours on 2 CPU cores, two
runs at a time). Single runs at these sizes scatter by up to 0.1 nats, more than a 2% prediction can afford; the fit
averages each model's seeds into one point (experiments/scaling.py: average_repeats).

    python -m experiments.sweep plan experiments/sweeps/isoflop_stdlib_seeds.py --out sweeps/iso3
    python -m experiments.sweep run sweeps/iso3 --parallel 2
    python -m experiments.sweep collect sweeps/iso3
    python -m experiments.scaling fit sweeps/iso3/runs.csv --out sweeps/iso3/fit

The seed-0 runs are the single-seed sweep's runs (the same configs), under the names NAME,seed=0.
"""

from experiments.sweeps.isoflop_stdlib import get_sweep as single_seed


def get_sweep():
    sweep = single_seed()
    sweep["isoflop"]["seeds"] = [0, 1, 2]
    return sweep
